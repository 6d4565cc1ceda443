#!/usr/bin/env bash
# The test fleet: N real OpenSSH hosts on this machine, one per loopback address.
#
# Host hI listens on 127.0.0.(10+I):22. Each host is an sshd of its own (own config,
# host key, pidfile and log) whose sessions are chrooted into an overlayfs root: one
# Debian bookworm base (debootstrap, cached as a zstd tarball) as the read-only lower
# layer, a small upper layer per host. The sshd runs in its own UTS and mount
# namespace, so the host's hostname and its /proc, /dev, /run mounts belong to it
# alone and disappear with it. See tests/fleet/README.md.
#
#   fleet.sh up [N]     start h1..hN (default 6); hosts already up stay up (also beyond N)
#   fleet.sh down       stop every host, unmount everything; keeps keys and caches
#   fleet.sh status     one line per host: name, address, state, pid
#   fleet.sh stop I     stop hI's sshd and its sessions: connections are refused
#   fleet.sh start I    start hI again with the disk it had (no wipe)
#   fleet.sh freeze I   SIGSTOP hI's listener: TCP connects, no banner
#   fleet.sh thaw I     SIGCONT it
set -euo pipefail
umask 022
export LC_ALL=C

SELF=$(readlink -f "${BASH_SOURCE[0]}")
FLEET=$(realpath -m "${TEND_FLEET_DIR:-/var/tmp/tend-fleet}")
CACHE=${TEND_FLEET_CACHE:-/var/cache/tend-fleet}
SUITE=bookworm
# coreutils, bash, dpkg, apt are in minbase already. python3: Ansible and pyinfra
# need it on the hosts for comparisons.
INCLUDE=passwd,procps,python3,sudo,ca-certificates
# Bump when the preparation of the base root below changes: it is part of the cache key.
BASE_PREP=1
WAIT_SECS=${TEND_FLEET_WAIT:-20}
MAX_HOSTS=200
SSHD=/usr/sbin/sshd

# Host roots cannot live under FLEET: sshd refuses a ChrootDirectory (and, with
# StrictModes, an AuthorizedKeysFile) with a group- or world-writable parent, and
# /var/tmp is 1777. They live under /var/lib, one directory per fleet dir, so two
# fleet dirs never share (or wipe) each other's roots.
LIB=/var/lib/tend-fleet
STATE=$LIB/fleet-$(printf '%s' "$FLEET" | sha256sum | cut -c1-12)
KEY=$FLEET/id_ed25519
AUTHORIZED_KEYS=$STATE/authorized_keys

say() { printf 'fleet: %s\n' "$*" >&2; }
die() {
  printf 'fleet: error: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '11,17s/^# \{0,1\}//p' "$SELF" >&2
  exit 2
}

now_us() { printf '%s\n' "${EPOCHREALTIME//[!0-9]/}"; }

# elapsed START_US: seconds since START_US, one decimal.
elapsed() {
  local us=$(($(now_us) - $1))
  printf '%d.%ds' $((us / 1000000)) $((us / 100000 % 10))
}

# ---------------------------------------------------------------- host naming

addr() { printf '127.0.0.%d\n' $((10 + $1)); }

# check_index I: I names a host slot.
check_index() {
  if ! [[ ${1:-} =~ ^[1-9][0-9]*$ ]] || (($1 > MAX_HOSTS)); then
    die "host index must be an integer from 1 to $MAX_HOSTS, got '${1:-}'"
  fi
}

# Paths of host I, in globals (bash has no structs; every caller sets them first).
host_vars() {
  H=h$1
  HD=$FLEET/$H
  HS=$STATE/$H
  ROOT=$HS/root
  CONF=$HD/sshd_config
  PIDF=$HD/sshd.pid
  LOGF=$HD/sshd.log
  HKEY=$HD/ssh_host_ed25519_key
}

# Indexes of the hosts that have a directory in FLEET, ascending.
configured_hosts() {
  local d
  for d in "$FLEET"/h[0-9]*; do
    [ -f "$d/sshd_config" ] || continue
    d=${d##*/h}
    if [[ $d =~ ^[0-9]+$ ]]; then printf '%s\n' "$d"; fi
  done | sort -n
}

# ------------------------------------------------------------ processes of a host

# listener_pid I: the pid of hI's listening sshd, if it runs. The pidfile is trusted
# only if the process is an sshd started with hI's config, so a recycled pid is never
# signalled.
listener_pid() {
  local pid exe cmd
  host_vars "$1"
  [ -s "$PIDF" ] || return 1
  read -r pid <"$PIDF" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ $exe == */sshd* ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *"$CONF"* ]] || return 1
  printf '%s\n' "$pid"
}

# proc_state PID: the one-letter state from /proc/PID/stat (R, S, T, Z...).
proc_state() {
  local stat
  stat=$(<"/proc/$1/stat") || return 1
  stat=${stat##*) }
  printf '%s\n' "${stat%% *}"
}

# host_state I: up | frozen | stopped (root mounted, no sshd) | down.
host_state() {
  local pid
  host_vars "$1"
  if pid=$(listener_pid "$1"); then
    if [ "$(proc_state "$pid")" = T ]; then echo frozen; else echo up; fi
  elif mountpoint -q "$ROOT"; then
    echo stopped
  else
    echo down
  fi
}

# pids_in_mntns NS: every process whose mount namespace is NS ("mnt:[4026532...]"),
# from one stat of all of them rather than a readlink per process.
pids_in_mntns() {
  stat -c '%N' /proc/[0-9]*/ns/mnt 2>/dev/null |
    awk -v ns="'$1'" '$3 == ns { split($1, a, "/"); print a[3] }' || true
}

# namespace_pids I: every process left in hI's mount namespace that is ours: an sshd
# or a process chrooted into hI's root. Namespace inode numbers are recycled, so the
# namespace alone is not proof enough to signal a process.
namespace_pids() {
  local ns p exe proot
  host_vars "$1"
  [ -s "$HD/mntns" ] || return 0
  ns=$(<"$HD/mntns")
  # Never the namespace this script runs in: that would be every process on the machine.
  [ "$ns" != "$(readlink /proc/self/ns/mnt)" ] || return 0
  for p in $(pids_in_mntns "$ns"); do
    exe=$(readlink "/proc/$p/exe" 2>/dev/null) || exe=
    proot=$(readlink "/proc/$p/root" 2>/dev/null) || proot=
    if [[ $exe == */sshd* || $proot == "$ROOT" || $proot == "$ROOT"/* ]]; then
      printf '%s\n' "$p"
    fi
  done
}

# kill_host I: stop hI's listener and every session of it; the root stays mounted.
kill_host() {
  local pid pids deadline
  host_vars "$1"
  if pid=$(listener_pid "$1"); then
    kill -TERM "$pid" 2>/dev/null || true
    # A frozen process keeps a pending SIGTERM until it runs again.
    kill -CONT "$pid" 2>/dev/null || true
  fi
  mapfile -t pids < <(namespace_pids "$1")
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    kill -CONT "${pids[@]}" 2>/dev/null || true
  fi
  deadline=$(($(now_us) + 3000000))
  while :; do
    mapfile -t pids < <(namespace_pids "$1")
    if pid=$(listener_pid "$1"); then pids+=("$pid"); fi
    ((${#pids[@]})) || break
    if (($(now_us) > deadline)); then
      say "$H: killing ${pids[*]} after 3 s"
      kill -KILL "${pids[@]}" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.05
  done
  rm -f "$PIDF" "$HD/mntns"
}

# ------------------------------------------------------------------- mounts

# umount_tree DIR: unmount everything at or below DIR, deepest first.
umount_tree() {
  local m
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do
    umount "$m" 2>/dev/null || {
      say "umount $m: busy, detaching it lazily"
      umount -l "$m"
    }
  done
}

# A path that sshd accepts as ChrootDirectory: every component root-owned and not
# group- or world-writable.
check_chroot_path() {
  local p=$1 owner mode
  while :; do
    read -r owner mode < <(stat -L -c '%u %a' "$p")
    if [ "$owner" != 0 ] || (((8#$mode & 8#022) != 0)); then
      die "$p (owner $owner, mode $mode) must be root-owned and not group/world-writable: sshd refuses a chroot below it"
    fi
    [ "$p" = / ] && break
    p=$(dirname "$p")
  done
}

# mount_root I [fresh]: mount hI's overlay root; with "fresh", on an empty upper layer.
mount_root() {
  local fresh=${2:-}
  host_vars "$1"
  if [ -n "$fresh" ]; then
    umount_tree "$ROOT"
    rm -rf --one-file-system "$HS/upper" "$HS/work"
  fi
  # umask 022: every directory made here is 0755, as the chroot checks want.
  mkdir -p "$HS/upper" "$HS/work" "$ROOT"
  chmod 0755 "$LIB" "$STATE" "$HS" "$HS/upper" "$ROOT"
  if ! mountpoint -q "$ROOT"; then
    mount -t overlay overlay \
      -o "lowerdir=$BASE,upperdir=$HS/upper,workdir=$HS/work" "$ROOT"
  fi
  check_chroot_path "$ROOT"
  if [ -n "$fresh" ]; then
    printf '%s\n' "$H" >"$ROOT/etc/hostname"
    # sudo resolves the host's own name; without this line it complains on every call.
    printf '127.0.0.1\tlocalhost\n%s\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
      "$(addr "$1")" "$H" >"$ROOT/etc/hosts"
  fi
  local shell
  shell=$(getent passwd root | cut -d: -f7)
  [ -x "$ROOT$shell" ] || die "$H: root's login shell $shell is missing inside $ROOT"
  [ -d "$ROOT/root" ] || die "$H: /root is missing inside $ROOT"
}

# ------------------------------------------------------------ machine setup

# The mirror apt already uses for $SUITE on this machine (TEND_FLEET_MIRROR overrides).
find_mirror() {
  local f uri
  if [ -n "${TEND_FLEET_MIRROR:-}" ]; then
    printf '%s\n' "$TEND_FLEET_MIRROR"
    return
  fi
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uris != "")
          { split(uris, u, " "); print u[1]; found = 1; exit }
        types = suites = uris = enabled = ""
      }
      /^#/ { next }
      /^[ \t]*$/ { flush(); next }
      { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, ""); val = $0 }
      key == "types" { types = val }
      key == "suites" { suites = val }
      key == "uris" { uris = val }
      key == "enabled" { enabled = tolower(val) }
      END { if (!found) flush() }' "$f")
    if [ -n "$uri" ]; then
      printf '%s\n' "$uri"
      return
    fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit } }' "$f")
    if [ -n "$uri" ]; then
      printf '%s\n' "$uri"
      return
    fi
  done
  die "no apt source for $SUITE in /etc/apt/sources.list{,.d}: set TEND_FLEET_MIRROR"
}

POLICY_RC_CREATED=
cleanup_policy_rc() {
  if [ -n "$POLICY_RC_CREATED" ]; then
    rm -f /usr/sbin/policy-rc.d
    POLICY_RC_CREATED=
  fi
}

ensure_packages() {
  local missing=()
  [ -x "$SSHD" ] || missing+=(openssh-server)
  command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  command -v zstd >/dev/null || missing+=(zstd)
  command -v ss >/dev/null || missing+=(iproute2)
  local tool
  for tool in unshare setsid mount umount mountpoint flock getent usermod; do
    command -v "$tool" >/dev/null || die "$tool is missing (util-linux, passwd and libc-bin are part of every Debian)"
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    # No package may start its daemon: a distribution sshd on *:22 would take every
    # 127.0.0.x:22 from the fleet. An existing policy-rc.d is left alone.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod 0755 /usr/sbin/policy-rc.d
      POLICY_RC_CREATED=1
      trap cleanup_policy_rc EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q -o DPkg::Lock::Timeout=300 update >&2
    # No recommends: openssh-server recommends libpam-systemd, which would pull
    # systemd onto the machine that runs the tests.
    apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}" >&2
    cleanup_policy_rc
  fi
  mkdir -p /run/sshd
  # With UsePAM no, sshd refuses any login of a user whose password is locked ('!'),
  # even with a key. '*' is "no password" without the lock; logins stay key-only.
  local pw
  pw=$(getent shadow root | cut -d: -f2)
  if [[ $pw == '!'* ]]; then
    say "root's password is locked: setting it to '*' (no password, not locked) so sshd lets root in by key"
    usermod -p '*' root
  fi
}

# is_distro_sshd PID: the sshd the openssh-server package starts (default config,
# pidfile /run/sshd.pid), not one of ours and not someone else's.
is_distro_sshd() {
  local pid=$1 exe cmd
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ $exe == /usr/sbin/sshd* ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ " $cmd " != *" -f "* ]] || return 1
  [ "$(cat /run/sshd.pid 2>/dev/null)" = "$pid" ]
}

# A listener on port 22 of every address would take 127.0.0.x:22 from the fleet. If it
# is the distribution's sshd (or systemd's ssh.socket), stop and disable it; anything
# else on *:22 is not ours to stop.
stop_distro_sshd() {
  local line local_addr users pid comm stopped=
  while read -r line; do
    # State Recv-Q Send-Q Local Peer Process
    read -r _ _ _ local_addr _ users <<<"$line"
    case ${local_addr%:22} in 0.0.0.0 | '*') ;; *) continue ;; esac
    pid=$(grep -o 'pid=[0-9]*' <<<"$users" | head -n1 | cut -d= -f2)
    comm=$(grep -o '(("[^"]*"' <<<"$users" | head -n1 | tr -d '(")')
    if [ "$comm" = systemd ] && [ -d /run/systemd/system ] && systemctl -q is-active ssh.socket 2>/dev/null; then
      say "stopping and disabling the distribution's ssh.socket on *:22"
      systemctl disable --now ssh.socket >&2
      stopped=1
    elif [ -n "$pid" ] && is_distro_sshd "$pid"; then
      say "stopping and disabling the distribution's sshd (pid $pid) on $local_addr"
      if [ -d /run/systemd/system ]; then
        systemctl disable --now ssh.service >&2 || kill -TERM "$pid"
      elif [ -x /etc/init.d/ssh ]; then
        /etc/init.d/ssh stop >&2 || kill -TERM "$pid"
      else
        kill -TERM "$pid"
      fi
      # Debian's own switch: both ssh.service and /etc/init.d/ssh honour it.
      touch /etc/ssh/sshd_not_to_be_run
      if command -v update-rc.d >/dev/null; then update-rc.d ssh disable >/dev/null 2>&1 || true; fi
      stopped=1
    else
      die "port 22 of every address ($local_addr) is held by ${comm:-an unknown process} ${pid:+(pid $pid)}: it would take 127.0.0.x:22 from the fleet, and it is not the distribution's sshd, so it is not stopped here"
    fi
  done < <(ss -Hltnp 'sport = :22')
  if [ -n "$stopped" ]; then
    local deadline=$(($(now_us) + 5000000))
    while ss -Hltn 'sport = :22' | awk '{print $4}' | grep -qE '^(0\.0\.0\.0|\*):22$'; do
      (($(now_us) < deadline)) || die "port 22 of every address is still taken after stopping the distribution's sshd"
      sleep 0.1
    done
  fi
}

# ------------------------------------------------------------ the base root

ensure_base() {
  local arch key mirror tarball tmp log t0
  arch=$(dpkg --print-architecture)
  key=$(printf '%s\n' "suite=$SUITE" variant=minbase "include=$INCLUDE" "arch=$arch" "prep=$BASE_PREP" |
    sha256sum | cut -c1-12)
  tarball=$CACHE/$SUITE-minbase-$key.tar.zst
  BASE=$LIB/base-$key
  [ -d "$BASE" ] && return 0
  mkdir -p "$CACHE" "$LIB"
  # One builder at a time, whatever the fleet dir. fd 8 is closed again below, so no
  # sshd inherits it.
  exec 8>"$LIB/.base.lock"
  flock -w 900 8 || die "another fleet.sh has been building the base root for 15 minutes"
  if [ -d "$BASE" ]; then
    exec 8>&-
    return 0
  fi
  tmp=$LIB/base-$key.tmp
  # An interrupted earlier run: debootstrap mounts proc and sys inside its target.
  umount_tree "$tmp"
  rm -rf --one-file-system "$tmp"
  if [ ! -s "$tarball" ]; then
    mirror=$(find_mirror)
    log=$CACHE/$SUITE-minbase-$key.debootstrap.log
    say "debootstrap $SUITE (minbase + $INCLUDE) from $mirror: about a minute, once"
    t0=$(now_us)
    if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$mirror" >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      umount_tree "$tmp"
      die "debootstrap failed; the whole log is $log"
    fi
    umount_tree "$tmp"
    # Package scripts inside the hosts must never start daemons: there is no service
    # manager, and a daemon would outlive its host.
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod 0755 "$tmp/usr/sbin/policy-rc.d"
    rm -f "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/cache/apt/*.bin
    mkdir -p "$tmp/root"
    say "debootstrap took $(elapsed "$t0"); caching it as $tarball"
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$tmp" -cf - . |
      zstd -q -T0 -6 -o "$tarball.tmp"
    mv -f "$tarball.tmp" "$tarball"
    printf 'suite=%s variant=minbase include=%s arch=%s prep=%s mirror=%s\n' \
      "$SUITE" "$INCLUDE" "$arch" "$BASE_PREP" "$mirror" >"$CACHE/$SUITE-minbase-$key.txt"
  else
    say "extracting $tarball"
    mkdir -m 0755 "$tmp"
    zstd -dcq "$tarball" | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C "$tmp"
  fi
  chmod 0755 "$tmp"
  mv "$tmp" "$BASE"
  exec 8>&-
}

# ------------------------------------------------------------ keys and files

ensure_client_key() {
  mkdir -p "$FLEET" "$STATE"
  if [ ! -s "$KEY" ] || [ ! -s "$KEY.pub" ]; then
    rm -f "$KEY" "$KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C tend-fleet -f "$KEY"
  fi
  # Read by each sshd before it chroots; it must sit on a path StrictModes accepts.
  install -m 0644 "$KEY.pub" "$AUTHORIZED_KEYS"
}

host_fingerprint() { ssh-keygen -lf "$FLEET/h$1/ssh_host_ed25519_key.pub" | awk '{print $2}'; }

# write_host_config I: host key (once, kept), sshd_config.
write_host_config() {
  host_vars "$1"
  mkdir -p "$HD"
  if [ ! -s "$HKEY" ] || [ ! -s "$HKEY.pub" ]; then
    rm -f "$HKEY" "$HKEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "$H" -f "$HKEY"
  fi
  cat >"$CONF.tmp" <<EOF
# $H of the tend test fleet (tests/fleet/fleet.sh); rewritten by every 'up'.
Port 22
ListenAddress $(addr "$1")
HostKey $HKEY
PidFile $PIDF
ChrootDirectory $ROOT
AuthorizedKeysFile $AUTHORIZED_KEYS
Subsystem sftp internal-sftp
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel VERBOSE
MaxSessions 100
MaxStartups 100:30:200
ClientAliveInterval 0
UseDNS no
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_*
EOF
  mv -f "$CONF.tmp" "$CONF"
}

# write_fleet_files N: known_hosts, inventory.yaml, hosts.tsv, ssh_config for h1..hN.
write_fleet_files() {
  local n=$1 i fp
  : >"$FLEET/known_hosts.tmp"
  printf 'name\taddress\tfingerprint\tpidfile\tlog\troot\n' >"$FLEET/hosts.tsv.tmp"
  {
    echo "# The tend test fleet, written by tests/fleet/fleet.sh up $n. Do not edit."
    echo "hosts:"
  } >"$FLEET/inventory.yaml.tmp"
  echo "# ssh -F $FLEET/ssh_config h1" >"$FLEET/ssh_config.tmp"
  for ((i = 1; i <= n; i++)); do
    host_vars "$i"
    fp=$(host_fingerprint "$i")
    printf '%s %s\n' "$(addr "$i")" "$(cut -d' ' -f1,2 "$HKEY.pub")" >>"$FLEET/known_hosts.tmp"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$H" "$(addr "$i")" "$fp" "$PIDF" "$LOGF" "$ROOT" \
      >>"$FLEET/hosts.tsv.tmp"
    cat >>"$FLEET/inventory.yaml.tmp" <<EOF
  - name: $H
    address: $(addr "$i")
    port: 22
    user: root
    identity: $KEY
    host_key: "$fp"
EOF
    cat >>"$FLEET/ssh_config.tmp" <<EOF
Host $H $(addr "$i")
  HostName $(addr "$i")
  User root
  IdentityFile $KEY
  IdentitiesOnly yes
  UserKnownHostsFile $FLEET/known_hosts
  StrictHostKeyChecking yes
EOF
  done
  local f
  for f in known_hosts hosts.tsv inventory.yaml ssh_config; do
    mv -f "$FLEET/$f.tmp" "$FLEET/$f"
  done
}

# ------------------------------------------------------------ starting a host

SSH_OPTS=()
set_ssh_opts() {
  SSH_OPTS=(-F /dev/null -n -i "$KEY" -o IdentitiesOnly=yes -o BatchMode=yes
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$FLEET/known_hosts"
    -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=3 -o ControlPath=none
    -o LogLevel=ERROR)
}

# on_host I COMMAND: run COMMAND on hI (one ssh session), with a hard time limit.
on_host() { timeout 10 ssh "${SSH_OPTS[@]}" "root@$(addr "$1")" "$2"; }

# Inside the host's fresh UTS + mount namespace (run by launch through unshare), then
# exec the sshd. Everything mounted here is private to this namespace.
ns_main() {
  local i=$1
  host_vars "$i"
  hostname "$H"
  # This namespace got a copy of every mount, other hosts' roots included; a copy here
  # would keep their overlay alive after they are stopped and wiped.
  awk -v s="$STATE/" -v r="$ROOT" 'index($5, s) == 1 && $5 != r && index($5, r "/") != 1 { print $5 }' \
    /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
  mount -t proc -o nosuid,nodev,noexec proc "$ROOT/proc"
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$ROOT/sys" || echo "fleet: no /sys in $H"
  # A small /dev of its own rather than the machine's: no disks inside a host.
  mount -t tmpfs -o mode=0755,nosuid,size=1m tmpfs "$ROOT/dev"
  local dev name major minor
  for dev in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r name major minor <<<"$dev"
    mknod -m 0666 "$ROOT/dev/$name" c "$major" "$minor"
  done
  # sshd allocates ptys before it chroots, on the machine's devpts.
  mkdir -m 0755 "$ROOT/dev/pts"
  mount --bind /dev/pts "$ROOT/dev/pts"
  # The machine's devpts may have ptmxmode=000; a node of our own opens the pts beside it.
  mknod -m 0666 "$ROOT/dev/ptmx" c 5 2
  mkdir -m 1777 "$ROOT/dev/shm"
  mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs "$ROOT/dev/shm"
  ln -s /proc/self/fd "$ROOT/dev/fd"
  ln -s /proc/self/fd/0 "$ROOT/dev/stdin"
  ln -s /proc/self/fd/1 "$ROOT/dev/stdout"
  ln -s /proc/self/fd/2 "$ROOT/dev/stderr"
  # /run starts empty on every start, as after a boot.
  mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m tmpfs "$ROOT/run"
  mkdir -m 1777 "$ROOT/run/lock"
  exec "$SSHD" -D -f "$CONF" -E "$LOGF"
}

# check_port_free I: nothing listens on hI's address and port yet (another fleet dir's
# host, say). Checked before hI's root is touched.
check_port_free() {
  local a
  a=$(addr "$1")
  if ss -Hltn 'sport = :22' | awk '{print $4}' | grep -qxF "$a:22"; then
    die "h$1: $a:22 is already taken: $(ss -Hltnp 'sport = :22' | grep -F "$a:22 ")"
  fi
}

# launch I: start hI's sshd in its own namespaces, without waiting for it (see
# launched); hosts start side by side.
declare -A LAUNCHED=()
launch() {
  local i=$1
  host_vars "$i"
  check_port_free "$i"
  # sshd's privilege separation directory; /run is emptied by a reboot.
  mkdir -p /run/sshd
  "$SSHD" -t -f "$CONF" || die "$H: sshd rejects $CONF"
  rm -f "$PIDF" "$HD/mntns"
  # setsid: the sshd must not belong to the caller's session or process group. All fds
  # are redirected and the lock fd closed, so the sshd holds nothing of the caller's.
  TEND_FLEET_DIR=$FLEET setsid unshare --uts --mount --propagation private -- \
    bash "$SELF" __ns "$i" </dev/null >"$HD/launch.log" 2>&1 8>&- 9>&- &
  LAUNCHED[$i]=$!
}

# launched I: wait until the sshd that launch started writes its pidfile (it listens by
# then), and record its mount namespace for kill_host.
launched() {
  local i=$1 bg=${LAUNCHED[$1]} pid deadline state
  host_vars "$i"
  deadline=$(($(now_us) + 5000000))
  until pid=$(listener_pid "$i"); do
    state=$(proc_state "$bg" 2>/dev/null) || state=Z
    if [ "$state" = Z ] || (($(now_us) > deadline)); then
      tail -n 20 "$HD/launch.log" "$LOGF" >&2 2>/dev/null || true
      die "$H: sshd did not start (logs above: $HD/launch.log, $LOGF)"
    fi
    sleep 0.02
  done
  readlink "/proc/$pid/ns/mnt" >"$HD/mntns"
  [ "$(<"$HD/mntns")" != "$(readlink /proc/self/ns/mnt)" ] ||
    die "$H: sshd runs in the machine's mount namespace; unshare did not take"
}

# What later tests take for granted, checked inside every host by its first session.
# shellcheck disable=SC2016 # expanded by the remote shell
CHECKS='test "$(id -u)" = 0 || { echo "id -u is $(id -u)"; exit 1; }
for c in stat sha256sum od readlink tr mktemp sync mv sudo python3 ps; do
  command -v "$c" >/dev/null || { echo "no $c"; exit 1; }
done
test -w /dev/null && test -d /root && test -d /proc/self || { echo "no /dev/null, /root or /proc"; exit 1; }'

# check_hosts I...: wait until every named host answers over ssh and passes CHECKS, all
# in parallel, at most WAIT_SECS in total (polling, no fixed sleep); name each host
# that does not, with the tail of its sshd log. Then check that the hosts do not share
# a root: a file written under /etc on the first is not visible on the second.
check_hosts() {
  local i deadline failed=() pids=() out k=0
  deadline=$(($(now_us) + WAIT_SECS * 1000000))
  out=$(mktemp -d)
  for i in "$@"; do
    (
      want="test \"\$(cat /etc/hostname)\" = h$i && test \"\$(hostname)\" = h$i ||
        { echo \"hostname \$(hostname), /etc/hostname \$(cat /etc/hostname), want h$i\"; exit 1; }
$CHECKS"
      while :; do
        rc=0
        on_host "$i" "$want" >"$out/$i" 2>&1 || rc=$?
        # 255: ssh could not connect or log in; 124: timeout. Anything else is the
        # answer of the host's shell.
        case $rc in 255 | 124) ;; *) exit "$rc" ;; esac
        (($(now_us) < deadline)) || exit "$rc"
        sleep 0.1
      done
    ) &
    pids+=($!)
  done
  for i in "$@"; do
    wait "${pids[k]}" || failed+=("$i")
    k=$((k + 1))
  done
  if ((${#failed[@]})); then
    for i in "${failed[@]}"; do
      host_vars "$i"
      printf '\n== %s (%s), state %s: %s\n   last lines of %s:\n' "$H" "$(addr "$i")" \
        "$(host_state "$i")" "$(tr '\n' ' ' <"$out/$i")" "$LOGF" >&2
      tail -n 15 "$LOGF" 2>/dev/null | sed 's/^/   /' >&2 || true
    done
    rm -rf "$out"
    die "hosts not answering within ${WAIT_SECS}s or failing the checks: $(printf 'h%s ' "${failed[@]}")"
  fi
  rm -rf "$out"
  if (($# >= 2)); then
    local a=$1 b=$2 probe=/etc/tend-fleet-isolation-$$
    on_host "$a" "echo h$a >$probe" || die "h$a: cannot write $probe"
    on_host "$b" "test ! -e $probe" &
    k=$!
    on_host "$a" "rm -f $probe" || die "h$a: cannot remove $probe"
    wait "$k" || die "a file written to /etc on h$a is visible on h$b: the hosts share their root"
  fi
}

# ------------------------------------------------------------ commands

take_lock() {
  mkdir -p "$FLEET"
  exec 9>"$FLEET/.lock"
  flock -w 600 9 || die "another fleet.sh holds $FLEET/.lock"
}

cmd_up() {
  local n=${1:-6} i t0 state kept=() fresh=()
  if ! [[ $n =~ ^[1-9][0-9]*$ ]] || ((n > MAX_HOSTS)); then
    die "up: N must be 1..$MAX_HOSTS, got '$n'"
  fi
  t0=$(now_us)
  take_lock
  ensure_packages
  stop_distro_sshd
  ensure_base
  ensure_client_key
  set_ssh_opts
  # Hosts beyond N from an earlier, bigger 'up' stay up: the fleet is at
  # least h1..hN, so two test runs asking for different sizes never take
  # each other's hosts away. `down` stops everything.
  for i in $(configured_hosts); do
    if ((i > n)) && [ "$(host_state "$i")" != down ]; then
      n=$i
    fi
  done
  for ((i = 1; i <= n; i++)); do
    write_host_config "$i"
  done
  write_fleet_files "$n"
  for ((i = 1; i <= n; i++)); do
    state=$(host_state "$i")
    case $state in
    up) kept+=("h$i") ;;
    frozen)
      say "h$i: frozen, thawing it"
      kill -CONT "$(listener_pid "$i")"
      kept+=("h$i")
      ;;
    *)
      # A host that is not running comes back fresh: empty upper layer, new log.
      check_port_free "$i"
      kill_host "$i"
      mount_root "$i" fresh
      : >"$LOGF"
      launch "$i"
      fresh+=("h$i")
      ;;
    esac
  done
  for i in "${!LAUNCHED[@]}"; do
    launched "$i"
  done
  local all
  mapfile -t all < <(seq 1 "$n")
  check_hosts "${all[@]}"
  say "up: h1..h$n answer (${#fresh[@]} started fresh${fresh:+: ${fresh[*]}}; ${#kept[@]} already up) in $(elapsed "$t0")"
  say "inventory: $FLEET/inventory.yaml  hosts: $FLEET/hosts.tsv  ssh: ssh -F $FLEET/ssh_config h1"
}

cmd_down() {
  local i t0 m
  t0=$(now_us)
  [ -d "$FLEET" ] || {
    say "down: no fleet in $FLEET"
    return 0
  }
  take_lock
  for i in $(configured_hosts); do
    kill_host "$i"
  done
  # Any sshd started with a config of this fleet, pidfile or not.
  local p cmd
  for p in $(stat -c '%N' /proc/[0-9]*/exe 2>/dev/null | awk -F"'" '$4 ~ /\/sshd( |$)/ { split($2, a, "/"); print a[3] }'); do
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
    if [[ $cmd == *"-f $FLEET/h"*/sshd_config* ]]; then
      say "stopping stray sshd $p: $cmd"
      kill -TERM "$p" 2>/dev/null || true
      kill -CONT "$p" 2>/dev/null || true
    fi
  done
  [ -d "$STATE" ] && umount_tree "$STATE"
  m=$(awk -v s="$STATE/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo)
  [ -z "$m" ] || die "down: still mounted: $m"
  say "down: every host stopped and unmounted in $(elapsed "$t0") (keys, base and cache kept)"
}

cmd_status() {
  local i state pid any=
  printf 'name\taddress\tstate\tpid\n'
  [ -d "$FLEET" ] || return 0
  for i in $(configured_hosts); do
    any=1
    state=$(host_state "$i")
    pid=$(listener_pid "$i") || pid=-
    printf 'h%s\t%s\t%s\t%s\n' "$i" "$(addr "$i")" "$state" "$pid"
  done
  [ -n "$any" ] || say "status: no hosts in $FLEET"
}

# configured I: hI has been brought up at least once in this fleet dir.
require_host() {
  check_index "$1"
  host_vars "$1"
  [ -f "$CONF" ] || die "h$1 is not part of the fleet in $FLEET: run 'fleet.sh up $1' first"
}

cmd_stop() {
  local a
  require_host "$1"
  take_lock
  kill_host "$1"
  a=$(addr "$1")
  while ss -Hltn 'sport = :22' | awk '{print $4}' | grep -qxF "$a:22"; do sleep 0.02; done
  say "h$1 stopped: connections to $a:22 are refused"
}

cmd_start() {
  require_host "$1"
  take_lock
  if [ "$(host_state "$1")" = up ]; then
    say "h$1 is already up"
    return 0
  fi
  [ "$(host_state "$1")" = frozen ] && die "h$1 is frozen: thaw it"
  ensure_base
  set_ssh_opts
  check_port_free "$1"
  kill_host "$1"
  mount_root "$1"
  launch "$1"
  launched "$1"
  check_hosts "$1"
  say "h$1 started (same disk as before) and answers"
}

cmd_freeze() {
  local pid
  require_host "$1"
  take_lock
  pid=$(listener_pid "$1") || die "h$1 is not running"
  kill -STOP "$pid"
  while [ "$(proc_state "$pid")" != T ]; do sleep 0.01; done
  say "h$1 frozen (sshd $pid stopped): TCP connects to $(addr "$1"):22, no banner; existing sessions go on"
}

cmd_thaw() {
  local pid
  require_host "$1"
  take_lock
  pid=$(listener_pid "$1") || die "h$1 is not running"
  kill -CONT "$pid"
  say "h$1 thawed"
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  if [ "$cmd" = __ns ]; then
    ns_main "$1"
    return
  fi
  [ "$(id -u)" = 0 ] || die "run as root: it mounts, chroots and starts sshd on port 22"
  case $cmd in
  up)
    [ $# -le 1 ] || usage
    cmd_up "$@"
    ;;
  down | status)
    [ $# -eq 0 ] || usage
    "cmd_$cmd"
    ;;
  stop | start | freeze | thaw)
    [ $# -eq 1 ] || usage
    "cmd_$cmd" "$1"
    ;;
  *) usage ;;
  esac
}

# Sourced (to test a function), it only defines them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
