#!/usr/bin/env bash
# Provision one VM of the Vagrant demo: the project's own set-up, then this node's part of
# the plan (addresses, sysctls, VIP, routes). Runs as root inside the VM; safe to re-run.
set -euo pipefail
node=${1:?usage: provision.sh NODE}
cd /pysteer
scripts/setup
.venv/bin/pysteer lab vm-setup --node "$node"
ln -sf /pysteer/.venv/bin/pysteer /usr/local/bin/pysteer
echo "provisioned $node"
