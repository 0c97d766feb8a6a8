#!/usr/bin/env bash
# The demo across the four VMs, run on the Vagrant host after `vagrant up`. It makes the
# cluster's keys on the steering VM and gives each other VM only its own files, starts the steering
# daemon and the two agents, connects `openssl s_client` from the client VM, moves its
# connection a -> b -> a with `pysteer migrate`, drains a to b, and shows the client's
# last lines. Everything goes through `vagrant ssh`; nothing else is needed on the host.
set -euo pipefail
cd "$(dirname "$0")"
dir=/etc/pysteer       # what each machine runs with: its own bundle
keep=/root/pysteer-ca  # on steer: the CA key and every node's key (keep it offline)
cfg="--config $dir/cluster.toml"

on() {  # on VM COMMAND...: run COMMAND as root on VM
  local vm=$1
  shift
  vagrant ssh "$vm" -c "sudo bash -c $(printf '%q' "$*")"
}

field() {  # a value from the plan (plan-vm.json), by a Python expression on p
  python3 -c "import json; p = json.load(open('plan-vm.json')); print($1)"
}

vip=$(field 'p["vip"]["v4"]')
steer_ip=$(field '[l["steer"]["v4"] for l in p["links"] if l["peer"] == "a"][0].split("/")[0]')
client_side=$(field '[l["steer"]["v4"] for l in p["links"] if l["peer"] == "client"][0].split("/")[0]')
a_ip=$(field '[l["peer_end"]["v4"] for l in p["links"] if l["peer"] == "a"][0].split("/")[0]')
b_ip=$(field '[l["peer_end"]["v4"] for l in p["links"] if l["peer"] == "b"][0].split("/")[0]')

echo "== cluster keys, made on steer; each machine gets only its own (certs bundle)"
on steer "pysteer lab cluster --variant vm --dir $keep --force"
# A re-run starts each machine's directory afresh: nothing of an earlier run stays there.
on steer "rm -rf $dir && pysteer certs bundle --dir $keep --node steer --out $dir"
for vm in a b; do
  on steer "pysteer certs bundle --dir $keep --node $vm --out /root/bundle-$vm --force"
  vagrant ssh steer -c "sudo tar -C /root/bundle-$vm -cf - . && sudo rm -rf /root/bundle-$vm" |
    vagrant ssh "$vm" -c "sudo rm -rf $dir && sudo install -d -m 0700 $dir && sudo tar -C $dir -xpf -"
done
# The client trusts the service CA only: it never sees a cluster key or the cluster's CA.
vagrant ssh steer -c "sudo cat $keep/service-ca.pem" |
  vagrant ssh client -c "sudo rm -rf $dir && sudo install -d $dir && sudo tee $dir/service-ca.pem >/dev/null"

echo "== the steering daemon on steer, an agent on a and on b"
on steer "ifname=\$(ip -o -4 addr show to $client_side | awk '{print \$2}');" \
  "nohup pysteer steer run --name demo --ifname \$ifname --host a=$a_ip --host b=$b_ip" \
  "--listen $steer_ip:7700 --tls-cert $dir/steer.pem --tls-key $dir/steer.key" \
  "--tls-ca $dir/ca.pem >/var/log/pysteer-steer.log 2>&1 &"
for vm in a b; do
  on "$vm" "nohup pysteer agent run $cfg --node $vm >/var/log/pysteer-agent.log 2>&1 &"
done
sleep 5
on a "pysteer status $cfg"

echo "== openssl s_client on the client VM, typing a line every 200 ms for a minute"
on client "nohup timeout 60 bash -c 'while sleep 0.2; do echo hello; done |" \
  "openssl s_client -connect $vip:443 -servername vip -CAfile $dir/service-ca.pem -quiet'" \
  ">/tmp/s_client.out 2>&1 &"
sleep 3
flow=$(on a "pysteer flows $cfg --json" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["flows"][0]["flow"])')
on a "pysteer migrate $cfg --flow $flow --to b"
sleep 1
on a "pysteer migrate $cfg --flow $flow --to a"
sleep 1
on a "pysteer drain $cfg --from a --to b"
sleep 2
echo "== the client's last lines (ticks and echoes keep counting)"
on client "tail -n 6 /tmp/s_client.out"
