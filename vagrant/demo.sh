#!/usr/bin/env bash
# The demo across the four VMs, run on the Vagrant host after `vagrant up`. It makes the
# cluster's keys on the steering VM and gives each other VM only its own files, starts the
# steering daemon and the two agents with pysteer's systemd units, connects `openssl
# s_client` from the client VM, moves its connection a -> b -> a with `pysteer migrate`,
# drains a to b, and then judges what the client saw: ticks in sequence, every line echoed
# once and in order, no reset. It prints PASS or FAIL and exits non-zero on FAIL. Safe to
# run again: it stops what an earlier run started, and removes the steering programs.
#
# Every command goes over ssh with `vagrant ssh-config`'s settings and no terminal (-T):
# `vagrant ssh -c` prints Vagrant's warnings on stdout and opens a pty, which corrupts
# any data piped through it (a tar stream, JSON).
set -euo pipefail
cd "$(dirname "$0")"
dir=/etc/pysteer       # what each machine runs with: its own bundle
keep=/root/pysteer-ca  # on steer: the CA key and every node's key (keep it offline)
cfg="--config $dir/cluster.toml"
ssh_config=$(mktemp)
trap 'rm -f "$ssh_config"' EXIT
vagrant ssh-config steer client host-a host-b >"$ssh_config"

on() {  # on VM COMMAND...: run COMMAND as root on VM (stdin and stdout are data)
  local vm=$1
  shift
  ssh -F "$ssh_config" -T -o LogLevel=ERROR "$vm" "sudo bash -c $(printf '%q' "$*")"
}

field() {  # a value from the plan (plan-vm.json), by a Python expression on p
  python3 -c "import json; p = json.load(open('plan-vm.json')); print($1)"
}

wait_for() {  # wait_for SECONDS WHAT VM COMMAND...: until COMMAND succeeds on VM
  local seconds=$1 what=$2 vm=$3
  shift 3
  for _ in $(seq "$seconds"); do
    if on "$vm" "$*" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "FAIL: $what did not happen within $seconds s"
  on "$vm" "$*" || true
  exit 1
}

vip=$(field 'p["vip"]["v4"]')
steer_ip=$(field '[l["steer"]["v4"] for l in p["links"] if l["peer"] == "a"][0].split("/")[0]')
client_side=$(field '[l["steer"]["v4"] for l in p["links"] if l["peer"] == "client"][0].split("/")[0]')
a_ip=$(field '[l["peer_end"]["v4"] for l in p["links"] if l["peer"] == "a"][0].split("/")[0]')
b_ip=$(field '[l["peer_end"]["v4"] for l in p["links"] if l["peer"] == "b"][0].split("/")[0]')
ifname=$(on steer "ip -o -4 addr show to $client_side" | awk '{print $2}')

echo "== an earlier run's daemons stop; the steering programs and maps go"
for vm in host-a host-b; do on "$vm" "systemctl stop 'pysteer-agent@*' || true"; done
on client "pkill -x openssl || true"
on steer "systemctl stop pysteer-steer@demo || true; pysteer steer destroy --name demo --ifname $ifname >/dev/null 2>&1 || true"

echo "== cluster keys, made on steer; each machine gets only its own (certs bundle)"
on steer "pysteer lab cluster --variant vm --dir $keep --force"
on steer "rm -rf $dir && pysteer certs bundle --dir $keep --node steer --out $dir"
for node in a b; do
  on steer "pysteer certs bundle --dir $keep --node $node --out /root/bundle-$node --force"
  on steer "tar -C /root/bundle-$node -cf - . && rm -rf /root/bundle-$node" |
    on "host-$node" "rm -rf $dir && install -d -m 0700 $dir && tar -C $dir -xpf -"
done
# The client trusts the service CA only: it never sees a cluster key or the cluster's CA.
on steer "cat $keep/service-ca.pem" |
  on client "rm -rf $dir && install -d $dir && cat >$dir/service-ca.pem"

echo "== the steering daemon on steer, an agent on host-a and host-b (systemd units)"
# tc mode: proven on every NIC. `auto` picks native XDP where a driver runs it, and on
# virtio-net that once lost every redirected packet while the demo still passed.
on steer "printf 'PYSTEER_STEER_ARGS=%s\n' '--mode tc --ifname $ifname --host a=$a_ip" \
  "--host b=$b_ip --listen $steer_ip:7700 --tls-cert $dir/steer.pem --tls-key $dir/steer.key" \
  "--tls-ca $dir/ca.pem' >$dir/steer-demo.env && systemctl restart pysteer-steer@demo"
for node in a b; do on "host-$node" "systemctl restart pysteer-agent@$node"; done
# BCC compiles the programs first: under emulation that took 25-28 s. Wait for it.
wait_for 180 "pysteer status (every node and the steering daemon up)" host-a "pysteer status $cfg"
on host-a "pysteer status $cfg"

echo "== openssl s_client on the client VM: 150 numbered lines, one every 200 ms"
on client "/pysteer/.venv/bin/python /pysteer/vagrant/check_client.py counters >/tmp/before.json"
# It stays connected after its last line (the judge reads the counters while it is, so
# that ending it cannot count as a reset); `timeout` ends it if this script dies first.
on client "rm -f /tmp/sent /tmp/s_client.out; nohup bash -c '(for i in \$(seq 150); do" \
  "echo line \$i; sleep 0.2; done; sleep 120) | tee /tmp/sent | timeout 150 openssl s_client" \
  "-connect $vip:443 -servername vip -CAfile $dir/service-ca.pem -quiet'" \
  ">/tmp/s_client.out 2>/tmp/s_client.err </dev/null &"
wait_for 20 "the client's connection" host-a \
  "pysteer flows $cfg --json | python3 -c 'import json, sys; sys.exit(not json.load(sys.stdin)[\"flows\"])'"
flow=$(on host-a "pysteer flows $cfg --json" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["flows"][0]["flow"])')
on host-a "pysteer migrate $cfg --flow $flow --to b"
sleep 2
on host-a "pysteer migrate $cfg --flow $flow --to a"
sleep 2
on host-a "pysteer drain $cfg --from a --to b"
on host-a "pysteer undrain $cfg --node a"

echo "== once the client has sent its 150 lines, judging what it saw"
wait_for 60 "the client's 150 lines" client "[ \$(wc -l </tmp/sent) -ge 150 ]"
sleep 3  # the last echo's way back
on client "tail -n 4 /tmp/s_client.out"
if on client "/pysteer/.venv/bin/python /pysteer/vagrant/check_client.py verify" \
  "/tmp/s_client.out /tmp/sent /tmp/before.json"; then
  result=0
else
  result=1
fi
on client "pkill -x openssl || true"
exit "$result"
