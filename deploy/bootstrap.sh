#!/usr/bin/env bash
# Entry point for a fresh Debian 12 machine, as root: installs what `make` itself needs
# (make, a C compiler for libvirt-python, Python with venv and headers, iproute2), then runs
# `make TARGET`. Everything else (libvirt, QEMU, the venv) is installed by the Makefile.
#   bash deploy/bootstrap.sh demo    # the lab and the daemon, showing real events
#   bash deploy/bootstrap.sh test    # everything CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bootstrap: run as root (apt, libvirtd and the lab need it)" >&2; exit 1; }
need=()
for cmd_pkg in make:make gcc:gcc python3:python3 ip:iproute2; do
  command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
python3 -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' 2>/dev/null \
  || need+=(python3-dev)
if ((${#need[@]})); then
  echo "bootstrap: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
exec make "${@:-test}"
