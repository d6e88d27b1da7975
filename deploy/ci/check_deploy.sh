#!/usr/bin/env bash
# Deployment checks, as CI runs them (root on Debian 12; systemd need not be PID 1):
#   1. systemd-analyze verify: the unit, alone and with the NVIDIA drop-in, prints nothing
#   2. systemd-analyze security --offline=true: overall exposure <= MAX_EXPOSURE (2.5), both
#   3. python -m build: an sdist and a wheel, from a clean copy of the tree
#   4. the wheel installs into a fresh venv and `hostagent --version` prints the version
#   5. ansible-lint --profile production on deploy/ansible
#   6. the playbook twice against localhost (-c local); the second run reports changed=0
#   7. the unit as installed by the playbook verifies clean against the real binary
#   8. (HOSTAGENT_BOOT_TEST=1 only) boot a throwaway systemd container (nspawn on an overlay of
#      this root) and check the installed service for real: READY=1 within TimeoutStartSec,
#      a STATUS= line, reload, and a clean stop
# Idempotent; quick once the pip cache is warm. Deploy tools live in their own venv
# (DEPLOY_VENV, default .venv-deploy), never in the project's .venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPLOY_VENV=${DEPLOY_VENV:-$ROOT/.venv-deploy}
MAX_EXPOSURE=${MAX_EXPOSURE:-2.5}
PYTHON=${PYTHON:-python3}
# The role builds its venv with Debian's python; the smoke test uses the same one.
TARGET_PYTHON=${TARGET_PYTHON:-/usr/bin/python3}
# Pinned so that a new lint rule upstream cannot turn CI red overnight; bump on purpose.
DEPLOY_REQS=(ansible-core==2.19.14 ansible-lint==26.10.1 build==1.6.1)
UNIT_SRC=$ROOT/deploy/systemd/hostagent.service
DROPIN_SRC=$ROOT/deploy/systemd/hostagent.service.d/nvidia.conf
INSTALLED_BIN=/opt/hostagent/venv/bin/hostagent

WORK=$(mktemp -d /tmp/check_deploy.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PASSED=0

step() { printf '\n== %s\n' "$*"; }
ok() { PASSED=$((PASSED + 1)); echo "ok: $*"; }
fail() { echo "check_deploy: FAIL: $*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1
export ANSIBLE_LOCALHOST_WARNING=False PIP_DISABLE_PIP_VERSION_CHECK=1

step "prerequisites"
[[ $(id -u) -eq 0 ]] || fail "run as root (the playbook installs into /opt, /etc and creates a user)"
apt_missing=()
command -v systemd-analyze >/dev/null || apt_missing+=(systemd)
"$TARGET_PYTHON" -c 'import ensurepip, venv' 2>/dev/null || apt_missing+=(python3-venv)
command -v unshare >/dev/null || apt_missing+=(util-linux)
if ((${#apt_missing[@]})); then
  apt-get update -q >/dev/null
  apt-get install -y -q "${apt_missing[@]}" >/dev/null
fi
stamp="$DEPLOY_VENV/.check_deploy-reqs"
if [[ ! -x $DEPLOY_VENV/bin/python || $(cat "$stamp" 2>/dev/null) != "${DEPLOY_REQS[*]}" ]]; then
  "$PYTHON" -m venv "$DEPLOY_VENV"
  "$DEPLOY_VENV/bin/python" -m pip install -q --upgrade pip
  "$DEPLOY_VENV/bin/python" -m pip install -q "${DEPLOY_REQS[@]}"
  echo "${DEPLOY_REQS[*]}" >"$stamp"
fi
export PATH="$DEPLOY_VENV/bin:$PATH"
ansible_v=$(ansible --version) lint_v=$(ansible-lint --nocolor --version 2>/dev/null)
sd_v=$(systemd-analyze --version)
echo "deploy venv $DEPLOY_VENV: ${ansible_v%%$'\n'*}; ${lint_v%%$'\n'*}; ${sd_v%%$'\n'*}"

# Two layouts to check: the unit alone, and the unit with its NVIDIA drop-in.
mkdir -p "$WORK/plain" "$WORK/nvidia/hostagent.service.d"
cp "$UNIT_SRC" "$WORK/plain/hostagent.service"
cp "$UNIT_SRC" "$WORK/nvidia/hostagent.service"
cp "$DROPIN_SRC" "$WORK/nvidia/hostagent.service.d/nvidia.conf"

# verify insists that ExecStart's binary exists. Before the playbook has installed it, give
# verify a stand-in at the real path inside a private mount namespace (a tmpfs over /opt that
# only this command sees), so the unit is verified exactly as shipped.
verify() {  # verify UNIT_PATH: prints verify's output; the caller wants none
  if [[ -x $INSTALLED_BIN ]]; then
    systemd-analyze verify "$1" 2>&1
  else
    unshare --mount --propagation private sh -c '
      mount -t tmpfs -o mode=0755 tmpfs /opt &&
      mkdir -p "$(dirname "$2")" && printf "#!/bin/sh\nexit 0\n" >"$2" && chmod 0755 "$2" &&
      systemd-analyze verify "$1" 2>&1' verify "$1" "$INSTALLED_BIN"
  fi
}

step "1. systemd-analyze verify"
for layout in plain nvidia; do
  out=$(verify "$WORK/$layout/hostagent.service") || fail "verify ($layout) failed: $out"
  [[ -z $out ]] || fail "verify ($layout) is not clean:"$'\n'"$out"
done
ok "unit verifies clean, alone and with the NVIDIA drop-in"

step "2. systemd-analyze security --offline=true (max $MAX_EXPOSURE)"
for layout in plain nvidia; do
  out=$(systemd-analyze security --offline=true --no-pager "$WORK/$layout/hostagent.service" 2>&1) ||
    fail "security ($layout) failed: $out"
  score=$(sed -n 's/.*Overall exposure level for hostagent.service: \([0-9.]*\).*/\1/p' <<<"$out")
  [[ -n $score ]] || fail "no overall exposure in the output of security ($layout):"$'\n'"$out"
  grep '✗' <<<"$out" | sed 's/  */ /g' || true
  awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' ||
    fail "exposure $score ($layout) is above $MAX_EXPOSURE"
  echo "exposure ($layout): $score"
done
ok "exposure at most $MAX_EXPOSURE"

step "3. python -m build (sdist + wheel)"
# From a clean copy of what git would commit: a stale build/ in the tree cannot leak in.
mkdir -p "$WORK/src" "$WORK/dist"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    (cd "$ROOT" && xargs -0 -r stat --printf '%n\0' 2>/dev/null) |
    tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK/src" -xf -
else
  tar -C "$ROOT" --exclude=.git --exclude='.venv*' --exclude=build --exclude=dist \
    --exclude='*.egg-info' -cf - . | tar -C "$WORK/src" -xf -
fi
"$DEPLOY_VENV/bin/python" -m build --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 ||
  { tail -40 "$WORK/build.log"; fail "python -m build failed"; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)
wheel="$WORK/dist/hostagent-$version-py3-none-any.whl"
sdist="$WORK/dist/hostagent-$version.tar.gz"
[[ -f $wheel && -f $sdist ]] || fail "expected $(basename "$wheel") and $(basename "$sdist"), got: $(ls "$WORK/dist")"
ok "built $(basename "$sdist") and $(basename "$wheel")"

step "4. the wheel installs and runs"
"$TARGET_PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$wheel" >"$WORK/pip.log" 2>&1 ||
  { tail -40 "$WORK/pip.log"; fail "pip install of the wheel failed"; }
got=$("$WORK/venv/bin/hostagent" --version)
[[ $got == "hostagent $version" ]] || fail "hostagent --version printed '$got', expected 'hostagent $version'"
ok "$got"

step "5. ansible-lint --profile production"
(cd "$ROOT/deploy/ansible" && ansible-lint --offline --nocolor --profile production) ||
  fail "ansible-lint"
ok "ansible-lint production profile"

step "6. playbook twice against localhost"
recap() { sed -n '/PLAY RECAP/,$p' "$1" | grep -E '^localhost'; }
for run in 1 2; do
  log="$WORK/play$run.log"
  if ! (cd "$ROOT/deploy/ansible" &&
        ansible-playbook -i inventory.ini -c local playbook.yml -e "hostagent_wheel=$wheel") \
        >"$log" 2>&1; then
    tail -60 "$log"
    fail "playbook run $run failed"
  fi
  echo "run $run: $(recap "$log" | tr -s ' ')"
done
grep -A3 'Say why the service is not started' "$WORK/play2.log" | grep '"msg"' || true
changed=$(recap "$WORK/play2.log" | sed -n 's/.*changed=\([0-9]*\).*/\1/p')
if [[ $changed != 0 ]]; then
  grep -E '^(TASK|changed)' "$WORK/play2.log" | grep -B1 '^changed' || true
  fail "second playbook run reported changed=$changed (want 0)"
fi
ok "playbook idempotent (second run changed=0)"

step "7. the installed unit against the installed binary"
"$INSTALLED_BIN" --version >/dev/null || fail "$INSTALLED_BIN --version"
cmp -s "$UNIT_SRC" /etc/systemd/system/hostagent.service ||
  fail "/etc/systemd/system/hostagent.service differs from $UNIT_SRC"
out=$(systemd-analyze verify /etc/systemd/system/hostagent.service 2>&1) || fail "verify: $out"
[[ -z $out ]] || fail "installed unit does not verify clean:"$'\n'"$out"
"$INSTALLED_BIN" check-config /etc/hostagent/hostagent.toml || fail "check-config of the deployed config"
ok "installed unit and config check out"

# --- 8. optional: the service under a real systemd ---------------------------------------
BOOT_PID="" BOOT_ROOT=""
boot_cleanup() {
  if [[ -n $BOOT_PID ]] && kill -0 "$BOOT_PID" 2>/dev/null; then
    [[ -n ${INIT_PID:-} ]] && nsenter -t "$INIT_PID" -a systemctl poweroff >/dev/null 2>&1 || true
    for _ in $(seq 30); do kill -0 "$BOOT_PID" 2>/dev/null || break; sleep 1; done
    kill "$BOOT_PID" 2>/dev/null || true
  fi
  if [[ -n $BOOT_ROOT ]]; then umount "$BOOT_ROOT/root" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
in_boot() { nsenter -t "$INIT_PID" -a "$@"; }

boot_test() {
  command -v systemd-nspawn >/dev/null || apt-get install -y -q systemd-container >/dev/null
  [[ -x /usr/sbin/libvirtd ]] || fail "boot test: needs libvirtd on this host (make lab-up)"
  BOOT_ROOT="$WORK/boot"
  mkdir -p "$BOOT_ROOT"/{upper,work,root}
  trap boot_cleanup EXIT
  # Everything written while booted lands in the overlay's upper dir, removed afterwards.
  mount -t overlay overlay -o "lowerdir=/,upperdir=$BOOT_ROOT/upper,workdir=$BOOT_ROOT/work" \
    "$BOOT_ROOT/root"
  local r="$BOOT_ROOT/root"
  rm -f "$r"/etc/systemd/system/multi-user.target.wants/postgresql*.service
  if [[ ! -e $r/lib/systemd/system/libvirtd.service && ! -e $r/etc/systemd/system/libvirtd.service ]]; then
    # No libvirt-daemon-system (no unit, no polkit policy): a bare libvirtd with unix auth.
    printf '[Service]\nExecStart=/usr/sbin/libvirtd\n[Install]\nWantedBy=multi-user.target\n' \
      >"$r/etc/systemd/system/libvirtd.service"
    ln -sf /etc/systemd/system/libvirtd.service "$r/etc/systemd/system/multi-user.target.wants/"
    printf 'auth_unix_ro = "none"\nauth_unix_rw = "none"\nunix_sock_group = "libvirt"\n' \
      >"$r/etc/libvirt/libvirtd.conf"
  fi
  systemd-nspawn -q -D "$r" -b --register=no --keep-unit --link-journal=no \
    >"$WORK/nspawn.log" 2>&1 </dev/null &
  BOOT_PID=$!
  INIT_PID=""
  for _ in $(seq 60); do
    for pid in $(pgrep -P "$BOOT_PID") ; do
      [[ $(cat "/proc/$pid/comm" 2>/dev/null) == systemd ]] && INIT_PID=$pid
    done
    [[ -n $INIT_PID ]] && break
    sleep 1
  done
  [[ -n $INIT_PID ]] || { cat "$WORK/nspawn.log"; fail "boot test: the container did not boot"; }
  local state="" i
  for i in $(seq 180); do
    state=$(in_boot systemctl show hostagent -P ActiveState 2>/dev/null || true)
    [[ $state == active || $state == failed ]] && break
    sleep 1
  done
  in_boot systemctl status hostagent --no-pager -l 2>&1 | head -12 || true
  [[ $state == active ]] || { in_boot journalctl -u hostagent -n 40 --no-pager -o cat || true
                              fail "boot test: hostagent is '$state', not active (no READY=1)"; }
  echo "active after ${i}s"
  local status
  status=$(in_boot systemctl show hostagent -P StatusText)
  [[ -n $status ]] || fail "boot test: no STATUS= line"
  in_boot systemctl reload hostagent || fail "boot test: reload"
  sleep 2
  [[ $(in_boot systemctl show hostagent -P ActiveState) == active ]] || fail "boot test: not active after reload"
  in_boot systemctl stop hostagent || fail "boot test: stop"
  [[ $(in_boot systemctl show hostagent -P Result) == success ]] ||
    fail "boot test: stop result $(in_boot systemctl show hostagent -P Result)"
  # Every line the daemon printed is one JSON object.
  in_boot journalctl -u hostagent -o cat --no-pager _COMM=hostagent |
    "$DEPLOY_VENV/bin/python" -c 'import json,sys; [json.loads(l) for l in sys.stdin if l.strip()]' ||
    fail "boot test: non-JSON log lines"
  ok "under systemd: READY, STATUS ($status), reload, clean stop"
}

if [[ ${HOSTAGENT_BOOT_TEST:-0} == 1 ]]; then
  step "8. the installed service under a real systemd (throwaway container)"
  boot_test
fi

echo
echo "check_deploy: $PASSED passed, 0 failed"
