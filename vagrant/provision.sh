#!/usr/bin/env bash
# Provision one VM of the Vagrant demo: the project's own set-up, then this node's part of
# the plan (addresses, sysctls, VIP, routes), and pysteer's systemd units, which the demo
# runs the daemons with. Runs as root inside the VM; safe to re-run.
set -euo pipefail
node=${1:?usage: provision.sh NODE [STEERING]}
steering=${2:-1}
cd /pysteer
scripts/setup
.venv/bin/pysteer lab vm-setup --node "$node" --steering "$steering"
ln -sf /pysteer/.venv/bin/pysteer /usr/local/bin/pysteer
# The units run /opt/pysteer/bin/pysteer (docs/deployment.md): here, the provisioned venv.
install -d /opt/pysteer/bin
ln -sf /pysteer/.venv/bin/pysteer /opt/pysteer/bin/pysteer
install -m 0644 packaging/systemd/pysteer-agent@.service packaging/systemd/pysteer-steer@.service \
  /etc/systemd/system/
systemctl daemon-reload
echo "provisioned $node"
