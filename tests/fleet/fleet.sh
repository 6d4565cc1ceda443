#!/usr/bin/env bash
# The test fleet: N real OpenSSH hosts on this machine, one per loopback address.
#
# Host hI listens on NET.(10+I):22 (I <= 240; see addr), NET being 127.0.0 unless TEND_FLEET_NET says
# otherwise (a second fleet, in a fleet dir of its own, on another loopback range: see
# "Second fleet" in tests/fleet/README.md). Each host is an sshd of its own (own config,
# host key, pidfile and log) whose sessions are chrooted into an overlayfs root: one
# Debian bookworm base (debootstrap, cached as a zstd tarball) as the read-only lower
# layer, a small upper layer per host. The sshd runs in its own UTS and mount
# namespace, so the host's hostname and its /proc, /dev, /run mounts belong to it
# alone and disappear with it. See tests/fleet/README.md.
#
#   fleet.sh up [N]     start h1..hN (default 6); hosts already up stay up (also beyond N)
#   fleet.sh down       stop every chroot host, unmount them; keeps keys and caches
#   fleet.sh status     one line per host: name, address, state, pid
#   fleet.sh stop I     stop hI's sshd and its sessions: connections are refused
#   fleet.sh start I    start hI again with the disk it had (no wipe)
#   fleet.sh freeze I   SIGSTOP hI's listener: TCP connects, no banner
#   fleet.sh thaw I     SIGCONT it
#   fleet.sh forget-revisions  remove the desired revision recorded on every chroot host
#                       (/run/tend/revision, SPEC 8.1), so that tests in fresh git repos
#                       are not fenced off by another test's commits
#   fleet.sh up-systemd [N]    start s1..sN (default 4): systemd-nspawn hosts, real systemd;
#                              hosts already up stay up (also beyond N)
#   fleet.sh down-systemd      stop every systemd host, unmount; keeps keys and caches
#   fleet.sh status-systemd    one line per systemd host: name, address, state, pid
#
# A fleet in a network namespace of its own (TEND_FLEET_NETNS=NAME, with its own
# TEND_FLEET_DIR and TEND_FLEET_NET=198.51.100, at most 20 hosts): every sshd runs in
# netns NAME; h1 listens on 198.51.100.11 on a veth reachable from the machine (the
# bastion), h2..hN on the namespace's loopback (198.51.100.12..), which the machine
# has no route to (a blackhole route covers 198.51.100.0/24): only h1 reaches them.
#
# Systemd host sI runs real systemd as PID 1 (systemd-nspawn --boot) on the machine's
# network; its own sshd (ssh.service) listens on 127.0.0.(100+I):22 only. Their files
# are under FLEET/systemd/; the chroot hosts' commands never touch them.
set -euo pipefail
umask 022
export LC_ALL=C

SELF=$(readlink -f "${BASH_SOURCE[0]}")
DEFAULT_FLEET=/var/tmp/tend-fleet
DEFAULT_NET=127.0.0
FLEET=$(realpath -m "${TEND_FLEET_DIR:-$DEFAULT_FLEET}")
CACHE=${TEND_FLEET_CACHE:-/var/cache/tend-fleet}
SUITE=bookworm
# coreutils, bash, dpkg, apt are in minbase already. python3: Ansible and pyinfra
# need it on the hosts for comparisons.
INCLUDE=passwd,procps,python3,sudo,ca-certificates
# Bump when the preparation of the base root below changes: it is part of the cache key.
BASE_PREP=1
WAIT_SECS=${TEND_FLEET_WAIT:-20}
CHECK_PARALLEL=${TEND_FLEET_CHECK_PARALLEL:-32}
MAX_HOSTS=500
SSHD=/usr/sbin/sshd

# Host roots cannot live under FLEET: sshd refuses a ChrootDirectory (and, with
# StrictModes, an AuthorizedKeysFile) with a group- or world-writable parent, and
# /var/tmp is 1777. They live under /var/lib, one directory per fleet dir, so two
# fleet dirs never share (or wipe) each other's roots.
LIB=/var/lib/tend-fleet
STATE=$LIB/fleet-$(printf '%s' "$FLEET" | sha256sum | cut -c1-12)
KEY=$FLEET/id_ed25519
AUTHORIZED_KEYS=$STATE/authorized_keys

# Systemd hosts (up-systemd): their own base (the chroot base plus systemd, dbus and
# openssh-server), their own files under SD_FLEET and roots under SD_STATE, which is
# not under STATE: 'down' unmounts everything under STATE, and must not pull the root
# from under a running container.
SD_INCLUDE=$INCLUDE,systemd,dbus,openssh-server
SD_PREP=systemd-2
SD_FLEET=$FLEET/systemd
SD_STATE=$LIB/systemd-$(printf '%s' "$FLEET" | sha256sum | cut -c1-12)
SD_WAIT_SECS=${TEND_FLEET_SYSTEMD_WAIT:-60}
SD_MAX_HOSTS=100

say() { printf 'fleet: %s\n' "$*" >&2; }
die() {
  printf 'fleet: error: %s\n' "$*" >&2
  exit 1
}

# The fleet's loopback range, NET: hI listens on NET.(10+I). A fleet dir keeps the
# range it was first brought up in (FLEET/net, written only for a range other than the
# default), so the commands after 'up' (status, stop, down...) find its hosts without
# TEND_FLEET_NET, and a second range given to the same dir is refused rather than
# leaving sshds of one config on two addresses. The default fleet dir stays on the
# default range: a second fleet needs a dir of its own, or the two would share (and
# rewrite) their keys, configs and inventories.
net_of_dir() {
  if [ -s "$FLEET/net" ]; then cat "$FLEET/net"; else printf '%s\n' "$DEFAULT_NET"; fi
}
choose_net() {
  local recorded
  recorded=$(net_of_dir)
  NET=${TEND_FLEET_NET:-$recorded}
  if [ -n "${TEND_FLEET_NETNS:-}" ] || [ -s "$FLEET/netns" ]; then
    [ "$NET" = 198.51.100 ] || die "a fleet in a netns lives on 198.51.100.x: set TEND_FLEET_NET=198.51.100"
    return 0
  fi
  [[ $NET =~ ^127\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$ ]] ||
    die "TEND_FLEET_NET must be the first three parts of a loopback address (127.X.Y), got '$NET'"
  if [ "$NET" != "$recorded" ] && [ -n "$(configured_hosts)" ]; then
    die "the fleet in $FLEET lives on $recorded.x, not $NET.x: use another TEND_FLEET_DIR for another range"
  fi
  if [ "$NET" != "$DEFAULT_NET" ] && [ "$FLEET" = "$DEFAULT_FLEET" ]; then
    die "TEND_FLEET_NET=$NET needs a TEND_FLEET_DIR of its own: $DEFAULT_FLEET is the default fleet's, on $DEFAULT_NET.x"
  fi
}

# The network namespace of a fleet dir (recorded like its range), or none; NSX runs
# a command inside it.
NETNS=
NSX=()
PRIVATE_NET=198.51.100
choose_netns() {
  local recorded=
  [ -s "$FLEET/netns" ] && recorded=$(<"$FLEET/netns")
  NETNS=${TEND_FLEET_NETNS:-$recorded}
  [ -n "$NETNS" ] || return 0
  [[ $NETNS =~ ^[a-z][a-z0-9]{0,9}$ ]] || die "TEND_FLEET_NETNS must be [a-z][a-z0-9]{0,9}, got '$NETNS'"
  [ "$FLEET" != "$DEFAULT_FLEET" ] || die "TEND_FLEET_NETNS needs a TEND_FLEET_DIR of its own"
  if [ -n "$recorded" ] && [ "$recorded" != "$NETNS" ]; then
    die "the fleet in $FLEET lives in netns $recorded, not $NETNS"
  fi
  NSX=(ip netns exec "$NETNS")
}

# ensure_netns N: the namespace, its loopback with h2..hN's addresses, the veth to h1,
# the machine's routes (h1 only; a blackhole for the rest of the range).
ensure_netns() {
  local n=$1 i out=$NETNS-o in=$NETNS-i
  ((n <= 20)) || die "a fleet in a netns has at most 20 hosts"
  printf '%s\n' "$NETNS" >"$FLEET/netns"
  [ -e "/run/netns/$NETNS" ] || ip netns add "$NETNS"
  ip -n "$NETNS" link set lo up
  if ! ip link show "$out" >/dev/null 2>&1; then
    ip link add "$out" type veth peer name "$in" netns "$NETNS"
  fi
  ip addr replace "$PRIVATE_NET.1/32" dev "$out"
  ip link set "$out" up
  ip -n "$NETNS" addr replace "$(addr 1)/32" dev "$in"
  ip -n "$NETNS" link set "$in" up
  ip -n "$NETNS" route replace "$PRIVATE_NET.1/32" dev "$in"
  ip route replace blackhole "$PRIVATE_NET.0/24"
  ip route replace "$(addr 1)/32" dev "$out" src "$PRIVATE_NET.1"
  for ((i = 2; i <= n; i++)); do
    ip -n "$NETNS" addr replace "$(addr "$i")/32" dev lo
  done
}

# remove_netns: the namespace, its veth and the machine's routes into it.
remove_netns() {
  [ -n "$NETNS" ] || return 0
  ip route del "$(addr 1)/32" 2>/dev/null || true
  ip route del blackhole "$PRIVATE_NET.0/24" 2>/dev/null || true
  ip link del "$NETNS-o" 2>/dev/null || true
  [ ! -e "/run/netns/$NETNS" ] || ip netns del "$NETNS"
  rm -f "$FLEET/netns"
}

usage() {
  sed -n '13,23s/^# \{0,1\}//p' "$SELF" >&2
  exit 2
}

now_us() { printf '%s\n' "${EPOCHREALTIME//[!0-9]/}"; }

# elapsed START_US: seconds since START_US, one decimal.
elapsed() {
  local us=$(($(now_us) - $1))
  printf '%d.%ds' $((us / 1000000)) $((us / 100000 % 10))
}

# ---------------------------------------------------------------- host naming

# 240 hosts per last octet (.11 to .250); h241 and later continue on the next
# third octet (NET 127.1.0: h241 is 127.1.1.11), so 500 hosts fit in a range.
addr() {
  local i0=$(($1 - 1))
  printf '%s.%d.%d\n' "${NET%.*}" $((${NET##*.} + i0 / 240)) $((11 + i0 % 240))
}

# check_index I: I names a host slot.
check_index() {
  if ! [[ ${1:-} =~ ^[1-9][0-9]*$ ]] || (($1 > MAX_HOSTS)); then
    die "host index must be an integer from 1 to $MAX_HOSTS, got '${1:-}'"
  fi
  if ((${NET##*.} + ($1 - 1) / 240 > 255)); then
    die "host h$1 would need an address past $NET.x's range: use a TEND_FLEET_NET with a lower third part"
  fi
  if [ "$NET" = "$DEFAULT_NET" ] && (($1 > 240)); then
    die "host h$1 of the default fleet would listen on 127.0.1.x, the scale fleet's range: use TEND_FLEET_NET"
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

# apt_install PACKAGE...: install them from the machine's apt sources.
apt_install() {
  say "installing $*"
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
  apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "$@" >&2
  cleanup_policy_rc
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
    apt_install "${missing[@]}"
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

# ensure_rootfs FLAVOR INCLUDE PREP PREPARE: debootstrap SUITE (minbase + INCLUDE) once,
# run PREPARE DIR on it, cache it as a tarball and extract it once; sets ROOTFS to the
# extracted tree. The cache key hashes suite, include list, architecture and PREP, so
# changing any of them builds a new base.
ensure_rootfs() {
  local flavor=$1 include=$2 prep=$3 prepare=$4 arch key mirror tarball tmp log t0
  arch=$(dpkg --print-architecture)
  key=$(printf '%s\n' "suite=$SUITE" variant=minbase "include=$include" "arch=$arch" "prep=$prep" |
    sha256sum | cut -c1-12)
  tarball=$CACHE/$SUITE-$flavor-$key.tar.zst
  ROOTFS=$LIB/base-$key
  [ -d "$ROOTFS" ] && return 0
  mkdir -p "$CACHE" "$LIB"
  # One builder at a time, whatever the fleet dir. fd 8 is closed again below, so no
  # sshd inherits it.
  exec 8>"$LIB/.base.lock"
  flock -w 900 8 || die "another fleet.sh has been building the base root for 15 minutes"
  if [ -d "$ROOTFS" ]; then
    exec 8>&-
    return 0
  fi
  tmp=$LIB/base-$key.tmp
  # An interrupted earlier run: debootstrap mounts proc and sys inside its target.
  umount_tree "$tmp"
  rm -rf --one-file-system "$tmp"
  if [ ! -s "$tarball" ]; then
    mirror=$(find_mirror)
    log=$CACHE/$SUITE-$flavor-$key.debootstrap.log
    say "debootstrap $SUITE (minbase + $include) from $mirror: about a minute, once"
    t0=$(now_us)
    if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" "$mirror" >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      umount_tree "$tmp"
      die "debootstrap failed; the whole log is $log"
    fi
    umount_tree "$tmp"
    "$prepare" "$tmp"
    rm -f "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/cache/apt/*.bin
    mkdir -p "$tmp/root"
    say "debootstrap took $(elapsed "$t0"); caching it as $tarball"
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$tmp" -cf - . |
      zstd -q -T0 -6 -o "$tarball.tmp"
    mv -f "$tarball.tmp" "$tarball"
    printf 'suite=%s variant=minbase include=%s arch=%s prep=%s mirror=%s\n' \
      "$SUITE" "$include" "$arch" "$prep" "$mirror" >"$CACHE/$SUITE-$flavor-$key.txt"
  else
    say "extracting $tarball"
    mkdir -m 0755 "$tmp"
    zstd -dcq "$tarball" | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C "$tmp"
  fi
  chmod 0755 "$tmp"
  mv "$tmp" "$ROOTFS"
  exec 8>&-
}

# Package scripts inside the chroot hosts must never start daemons: there is no
# service manager, and a daemon would outlive its host.
prepare_chroot_base() {
  printf '#!/bin/sh\nexit 101\n' >"$1/usr/sbin/policy-rc.d"
  chmod 0755 "$1/usr/sbin/policy-rc.d"
}

ensure_base() {
  ensure_rootfs minbase "$INCLUDE" "$BASE_PREP" prepare_chroot_base
  BASE=$ROOTFS
}

# ------------------------------------------------------------ keys and files

# Logins other than root (SPEC 8.9 tests): sshd looks a user up on the machine
# before it chroots, so `deploy` (to be given sudo on a host) and `nosudo` exist on
# the machine with fixed uids above UID_MAX (useradd never hands those out), no
# password (`*`: key-only, and accepted with UsePAM no) and `/` as home. Inside a host
# they exist only once a test creates them there (same uid).
LOGIN_USERS="deploy:60100 nosudo:60101"
ensure_login_users() {
  local u name uid
  for u in $LOGIN_USERS; do
    name=${u%%:*} uid=${u##*:}
    if ! getent passwd "$name" >/dev/null; then
      useradd -K UID_MAX=65000 -K GID_MAX=65000 --no-create-home --home-dir / --shell /bin/bash -u "$uid" -U "$name" ||
        die "cannot create login user $name"
    fi
    [ "$(id -u "$name")" = "$uid" ] || die "user $name exists with uid $(id -u "$name"), not $uid"
    usermod -p '*' "$name"
  done
}

ensure_client_key() {
  mkdir -p "$FLEET" "$STATE"
  if [ ! -s "$KEY" ] || [ ! -s "$KEY.pub" ]; then
    rm -f "$KEY" "$KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C tend-fleet -f "$KEY"
  fi
  # Read by each sshd before it chroots; it must sit on a path StrictModes accepts.
  install -m 0644 "$KEY.pub" "$AUTHORIZED_KEYS"
}


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

# write_host_files DIR N VARS ADDR HEADER: known_hosts, inventory.yaml, hosts.tsv and
# ssh_config in DIR for hosts 1..N, whose paths VARS I sets (host_vars, sd_vars) and
# whose address is ADDR I; HEADER heads inventory.yaml.
write_host_files() {
  local d=$1 n=$2 vars=$3 addr_of=$4 header=$5 i fp a
  : >"$d/known_hosts.tmp"
  printf 'name\taddress\tfingerprint\tpidfile\tlog\troot\n' >"$d/hosts.tsv.tmp"
  {
    echo "# $header"
    echo "hosts:"
  } >"$d/inventory.yaml.tmp"
  "$vars" 1
  echo "# ssh -F $d/ssh_config $H" >"$d/ssh_config.tmp"
  for ((i = 1; i <= n; i++)); do
    "$vars" "$i"
    a=$("$addr_of" "$i")
    fp=$(ssh-keygen -lf "$HKEY.pub" | awk '{print $2}')
    printf '%s %s\n' "$a" "$(cut -d' ' -f1,2 "$HKEY.pub")" >>"$d/known_hosts.tmp"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$H" "$a" "$fp" "$PIDF" "$LOGF" "$ROOT" >>"$d/hosts.tsv.tmp"
    cat >>"$d/inventory.yaml.tmp" <<EOF
  - name: $H
    address: $a
    port: 22
    user: root
    identity: $KEY
    host_key: "$fp"
EOF
    cat >>"$d/ssh_config.tmp" <<EOF
Host $H $a
  HostName $a
  User root
  IdentityFile $KEY
  IdentitiesOnly yes
  UserKnownHostsFile $d/known_hosts
  StrictHostKeyChecking yes
EOF
  done
  local f
  for f in known_hosts hosts.tsv inventory.yaml ssh_config; do
    mv -f "$d/$f.tmp" "$d/$f"
  done
}

# write_fleet_files N: the fleet files for h1..hN.
write_fleet_files() {
  write_host_files "$FLEET" "$1" host_vars addr \
    "The tend test fleet, written by tests/fleet/fleet.sh up $1. Do not edit."
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
on_host() { timeout 10 "${NSX[@]}" ssh "${SSH_OPTS[@]}" "root@$(addr "$1")" "$2"; }

# Inside the host's fresh UTS + mount namespace (run by launch through unshare), then
# exec the sshd. Everything mounted here is private to this namespace.
ns_main() {
  local i=$1
  host_vars "$i"
  hostname "$H"
  # This namespace got a copy of every mount, other hosts' roots included (systemd hosts
  # and other fleet dirs too); a copy here would keep their overlay alive after they are
  # stopped and wiped.
  awk -v lib="$LIB/" -v r="$ROOT" 'index($5, lib) == 1 && $5 != r && index($5, r "/") != 1 { print $5 }' \
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
  if "${NSX[@]}" ss -Hltn 'sport = :22' | awk '{print $4}' | grep -qxF "$a:22"; then
    die "h$1: $a:22 is already taken: $("${NSX[@]}" ss -Hltnp 'sport = :22' | grep -F "$a:22 ")"
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
  rm -f "$PIDF" "$HD/mntns" "$HD/launch.pid"
  # setsid: the sshd must not belong to the caller's session or process group. All fds
  # are redirected and the lock fd closed, so the sshd holds nothing of the caller's.
  # The subshell around it makes the sshd no child of this script: with a couple of
  # hundred children, and pids wrapping around meanwhile, bash was seen waiting forever
  # for a command that had long ended. Its pid goes through a file instead of $!.
  (
    TEND_FLEET_DIR=$FLEET TEND_FLEET_NET=$NET "${NSX[@]}" setsid unshare --uts --mount --propagation private -- \
      bash "$SELF" __ns "$i" </dev/null >"$HD/launch.log" 2>&1 8>&- 9>&- &
    printf '%s\n' "$!" >"$HD/launch.pid"
  )
  LAUNCHED[$i]=1
}

# launched I: wait until the sshd that launch started writes its pidfile (it listens by
# then), and record its mount namespace for kill_host. Each host gets 5 s from when it
# is waited for, or until LAUNCH_DEADLINE if that is later: hosts start side by side,
# and a hundred of them starting on a busy machine take longer than 5 s between them
# (the whole launch phase then has the WAIT_SECS that 'up' was given).
LAUNCH_DEADLINE=0
launched() {
  local i=$1 bg pid deadline state
  host_vars "$i"
  read -r bg <"$HD/launch.pid"
  deadline=$(($(now_us) + 5000000))
  ((deadline >= LAUNCH_DEADLINE)) || deadline=$LAUNCH_DEADLINE
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
  local i deadline failed=() out
  deadline=$(($(now_us) + WAIT_SECS * 1000000))
  out=$(mktemp -d)
  for i in "$@"; do
    # At most CHECK_PARALLEL checks at once: hundreds of ssh clients started
    # together on a small machine each outlast their 10 s timeout, retry, and
    # none ever gets through.
    while (($(jobs -rp | wc -l) >= CHECK_PARALLEL)); do wait -n || true; done
    (
      want="test \"\$(cat /etc/hostname)\" = h$i && test \"\$(hostname)\" = h$i ||
        { echo \"hostname \$(hostname), /etc/hostname \$(cat /etc/hostname), want h$i\"; exit 1; }
$CHECKS"
      while :; do
        rc=0
        on_host "$i" "$want" >"$out/$i" 2>&1 || rc=$?
        # 255: ssh could not connect or log in; 124: timeout. Anything else is the
        # answer of the host's shell.
        case $rc in 255 | 124) ;; *) break ;; esac
        (($(now_us) < deadline)) || break
        sleep 0.1
      done
      echo "$rc" >"$out/$i.rc"
    ) &
  done
  wait
  for i in "$@"; do
    [ "$(cat "$out/$i.rc" 2>/dev/null)" = 0 ] || failed+=("$i")
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
  if (($# >= 2)); then check_isolation on_host h "$1" "$2"; fi
}

# check_isolation ON PREFIX A B: a file written under /etc on host A (with ON, on_host
# or on_sd) is not visible on host B: the hosts do not share a root.
check_isolation() {
  local on=$1 p=$2 a=$3 b=$4 probe=/etc/tend-fleet-isolation-$$ k
  "$on" "$a" "echo $p$a >$probe" || die "$p$a: cannot write $probe"
  "$on" "$b" "test ! -e $probe" &
  k=$!
  "$on" "$a" "rm -f $probe" || die "$p$a: cannot remove $probe"
  wait "$k" || die "a file written to /etc on $p$a is visible on $p$b: the hosts share their root"
}

# ------------------------------------------------------------ systemd hosts

sd_addr() { printf '127.0.0.%d\n' $((100 + $1)); }

# Paths of systemd host I, in globals (as host_vars does for hI).
sd_vars() {
  H=s$1
  HD=$SD_FLEET/$H
  HS=$SD_STATE/$H
  ROOT=$HS/root
  PIDF=$HD/nspawn.pid
  LOGF=$HD/nspawn.log
  HKEY=$HD/ssh_host_ed25519_key
}

check_sd_index() {
  if ! [[ ${1:-} =~ ^[1-9][0-9]*$ ]] || (($1 > SD_MAX_HOSTS)); then
    die "systemd host index must be an integer from 1 to $SD_MAX_HOSTS, got '${1:-}'"
  fi
}

# Indexes of the systemd hosts that have a directory in SD_FLEET, ascending.
sd_configured_hosts() {
  local d
  for d in "$SD_FLEET"/s[0-9]*; do
    [ -f "$d/ssh_host_ed25519_key" ] || continue
    d=${d##*/s}
    if [[ $d =~ ^[0-9]+$ ]]; then printf '%s\n' "$d"; fi
  done | sort -n
}

# sd_pid I: the pid of sI's systemd-nspawn, if it runs. The pidfile is trusted only if
# the process is a systemd-nspawn booting sI's root, so a recycled pid is never signalled.
sd_pid() {
  local pid exe cmd
  sd_vars "$1"
  [ -s "$PIDF" ] || return 1
  read -r pid <"$PIDF" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ $exe == */systemd-nspawn ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *"--directory=$ROOT "* ]] || return 1
  printf '%s\n' "$pid"
}

# sd_state I: up (nspawn runs) | stopped (root mounted, no container) | down.
sd_state() {
  sd_vars "$1"
  if sd_pid "$1" >/dev/null; then
    echo up
  elif mountpoint -q "$ROOT"; then
    echo stopped
  else
    echo down
  fi
}

# sd_cgroup_pids I: every process in sI's cgroups: the container's, and its nspawn.
sd_cgroup_pids() {
  local d
  for d in $(sd_cgroups "$1"); do
    [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

# sd_kill I: shut sI down: SIGTERM makes systemd-nspawn power the container off in
# order (SIGRTMIN+3 to its systemd); SIGKILL after 15 s. The root stays mounted.
sd_kill() {
  local pid pids deadline
  sd_vars "$1"
  if pid=$(sd_pid "$1"); then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(($(now_us) + 15000000))
    while [ -e "/proc/$pid" ] && [ "$(proc_state "$pid" 2>/dev/null)" != Z ]; do
      if (($(now_us) > deadline)); then
        say "$H: systemd-nspawn $pid still runs 15 s after SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.05
    done
  fi
  # The container's processes die with its PID namespace; make sure, by its cgroups,
  # which hold nothing else.
  mapfile -t pids < <(sd_cgroup_pids "$1")
  if ((${#pids[@]})); then
    say "$H: killing leftover processes ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true
    deadline=$(($(now_us) + 3000000))
    while [ -n "$(sd_cgroup_pids "$1")" ] && (($(now_us) < deadline)); do sleep 0.05; done
  fi
  rm -f "$PIDF"
  sd_remove_cgroups "$1"
}

# sd_host_config I: sI's host key, generated once and kept, so its fingerprint stays.
sd_host_config() {
  sd_vars "$1"
  mkdir -p "$HD"
  if [ ! -s "$HKEY" ] || [ ! -s "$HKEY.pub" ]; then
    rm -f "$HKEY" "$HKEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "$H" -f "$HKEY"
  fi
}

# sd_mount_root I [fresh]: mount sI's overlay root; with "fresh", on an empty upper
# layer, then write what makes it sI: hostname, machine id, host key, the sshd
# drop-in that binds it to sI's address only, the fleet's client key for root.
sd_mount_root() {
  local fresh=${2:-} a
  sd_vars "$1"
  if [ -n "$fresh" ]; then
    umount_tree "$ROOT"
    rm -rf --one-file-system "$HS/upper" "$HS/work"
  fi
  mkdir -p "$HS/upper" "$HS/work" "$ROOT"
  if ! mountpoint -q "$ROOT"; then
    mount -t overlay overlay \
      -o "lowerdir=$SD_BASE,upperdir=$HS/upper,workdir=$HS/work" "$ROOT"
  fi
  [ -n "$fresh" ] || return 0
  a=$(sd_addr "$1")
  printf '%s\n' "$H" >"$ROOT/etc/hostname"
  printf '127.0.0.1\tlocalhost\n%s\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    "$a" "$H" >"$ROOT/etc/hosts"
  # A machine id of its own (the base's is empty): journald and dbus want one.
  tr -d '-' </proc/sys/kernel/random/uuid >"$ROOT/etc/machine-id"
  install -m 0600 "$HKEY" "$ROOT/etc/ssh/ssh_host_ed25519_key"
  install -m 0644 "$HKEY.pub" "$ROOT/etc/ssh/ssh_host_ed25519_key.pub"
  # Debian's sshd_config includes sshd_config.d/*.conf first, and the first value of a
  # keyword wins. Without ListenAddress, sshd would take port 22 of every address.
  cat >"$ROOT/etc/ssh/sshd_config.d/tend-fleet.conf" <<EOC
# $H of the tend test fleet (tests/fleet/fleet.sh up-systemd); written at a fresh start.
ListenAddress $a
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel VERBOSE
MaxSessions 100
MaxStartups 100:30:200
UseDNS no
PrintMotd no
EOC
  install -d -m 0700 "$ROOT/root/.ssh"
  install -m 0600 "$KEY.pub" "$ROOT/root/.ssh/authorized_keys"
}

# What the systemd base needs beyond debootstrap, done once before it is cached.
prepare_systemd_base() {
  local r=$1
  # Every host gets its own host key and machine id at its first start.
  rm -f "$r"/etc/ssh/ssh_host_*
  : >"$r/etc/machine-id"
  rm -f "$r/var/lib/dbus/machine-id"
  ln -s /etc/machine-id "$r/var/lib/dbus/machine-id"
  # The hosts share the machine's network: apt's timers would reach Debian's mirrors
  # from inside them. Nobody logs in on the console either.
  local u
  for u in apt-daily.timer apt-daily-upgrade.timer console-getty.service; do
    ln -sfn /dev/null "$r/etc/systemd/system/$u"
  done
  # A harmless unit for tests to start, stop, enable and restart: disabled, stopped.
  cat >"$r/etc/systemd/system/tend-demo.service" <<'EOU'
[Unit]
Description=tend test fleet demo unit (sleeps; does nothing)

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
EOU
}

ensure_sd_base() {
  ensure_rootfs systemd "$SD_INCLUDE" "$SD_PREP" prepare_systemd_base
  SD_BASE=$ROOTFS
}

ensure_sd_packages() {
  ensure_packages
  # systemd-nspawn; it brings systemd's files onto the machine, not systemd as its init.
  command -v systemd-nspawn >/dev/null || apt_install systemd-container
  # Each container's systemd takes inotify instances; past about 22 containers the
  # default of 128 runs out ("Too many open files").
  local max
  max=$(sysctl -n fs.inotify.max_user_instances)
  if ((max < 8192)); then
    say "raising fs.inotify.max_user_instances from $max to 8192 (systemd in each container needs some)"
    sysctl -q -w fs.inotify.max_user_instances=8192
  fi
}

sd_check_port_free() {
  local a
  a=$(sd_addr "$1")
  if ss -Hltn 'sport = :22' | awk '{print $4}' | grep -qxF "$a:22"; then
    die "s$1: $a:22 is already taken: $(ss -Hltnp 'sport = :22' | grep -F "$a:22 ")"
  fi
}

# sd_cgroups I: sI's own cgroup directory in each hierarchy systemd uses here (the
# cgroup2 mount, and the name=systemd one on a hybrid machine), one per line.
sd_cgroups() {
  awk -v sub_="tend-${SD_STATE##*/}/s$1" '
    $9 == "cgroup2" || ($9 == "cgroup" && $NF ~ /(^|,)name=systemd(,|$)/) { print $5 "/" sub_ }' \
    /proc/self/mountinfo
}

# sd_launch I: boot sI's root with systemd-nspawn, in the background. --register=no and
# --keep-unit: the machine does not run systemd, so there is no machined and no bus to
# register with. No --private-network: the container uses the machine's network, where
# its sshd binds only sI's loopback address. The console goes to nspawn.log.
#
# --keep-unit makes the container's cgroup tree the one nspawn was started in. Each
# host gets a cgroup of its own first (sd_cgroups): sharing one, the containers' systemds
# would manage the same system.slice/*.service groups, and stopping a unit in one host
# would kill its namesake in the others.
sd_launch() {
  local i=$1 cg
  sd_vars "$i"
  sd_check_port_free "$i"
  rm -f "$PIDF"
  mapfile -t cg < <(sd_cgroups "$i")
  ((${#cg[@]})) || die "$H: no cgroup2 or name=systemd cgroup hierarchy is mounted"
  # The inner bash moves itself into sI's cgroups, then becomes systemd-nspawn: $! is
  # its pid.
  setsid bash -c 'for d in "${@:3}"; do mkdir -p "$d" && echo $$ >"$d/cgroup.procs" || exit 1; done
    exec systemd-nspawn --quiet --boot "--directory=$1" "--machine=$2" \
      --register=no --keep-unit --link-journal=no --console=read-only' \
    sd-launch "$ROOT" "$H" "${cg[@]}" </dev/null >"$LOGF" 2>&1 8>&- 9>&- &
  printf '%s\n' "$!" >"$PIDF"
}

# sd_remove_cgroups I: remove sI's (empty) cgroup directories, deepest first.
sd_remove_cgroups() {
  local d
  for d in $(sd_cgroups "$1"); do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

SD_SSH_OPTS=()
set_sd_ssh_opts() {
  SD_SSH_OPTS=(-F /dev/null -n -i "$KEY" -o IdentitiesOnly=yes -o BatchMode=yes
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$SD_FLEET/known_hosts"
    -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=3 -o ControlPath=none
    -o LogLevel=ERROR)
}

# on_sd I COMMAND: run COMMAND on sI (one ssh session), with a hard time limit.
on_sd() { timeout "${3:-10}" ssh "${SD_SSH_OPTS[@]}" "root@$(sd_addr "$1")" "$2"; }

# What tests take for granted on a systemd host, checked by its first session, which
# also waits (at most until the deadline) for the boot to finish.
# shellcheck disable=SC2016 # expanded by the remote shell
SD_CHECKS='st=$(systemctl is-system-running --wait 2>&1)
[ "$st" = running ] || { echo "system is $st; failed units: $(systemctl --failed --plain --no-legend | tr "\n" " ")"; exit 1; }
test "$(cat /proc/1/comm)" = systemd || { echo "PID 1 is $(cat /proc/1/comm)"; exit 1; }
test "$(systemctl show -p ActiveState --value ssh.service)" = active || { echo "ssh.service is not active"; exit 1; }
test "$(systemctl show -p LoadState --value tend-demo.service)" = loaded || { echo "tend-demo.service is not loaded"; exit 1; }
for c in stat sha256sum od readlink tr mktemp sync mv systemctl; do
  command -v "$c" >/dev/null || { echo "no $c"; exit 1; }
done'

# sd_check_hosts I...: wait until every named host answers over ssh, has booted
# ("running") and passes SD_CHECKS, all in parallel, at most SD_WAIT_SECS in total;
# then check that two hosts do not share a root.
sd_check_hosts() {
  local i deadline failed=() pids=() out k=0
  deadline=$(($(now_us) + SD_WAIT_SECS * 1000000))
  out=$(mktemp -d)
  for i in "$@"; do
    (
      want="test \"\$(cat /etc/hostname)\" = s$i && test \"\$(hostname)\" = s$i ||
        { echo \"hostname \$(hostname), /etc/hostname \$(cat /etc/hostname), want s$i\"; exit 1; }
$SD_CHECKS"
      while :; do
        rc=0
        left=$(((deadline - $(now_us)) / 1000000 + 1))
        ((left >= 1)) || left=1
        on_sd "$i" "$want" "$left" >"$out/$i" 2>&1 || rc=$?
        case $rc in 255 | 124) ;; *) exit "$rc" ;; esac
        (($(now_us) < deadline)) || exit "$rc"
        # The container died: no point waiting.
        sd_pid "$i" >/dev/null || exit 1
        sleep 0.2
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
      sd_vars "$i"
      printf '\n== %s (%s), state %s: %s\n   last lines of %s:\n' "$H" "$(sd_addr "$i")" \
        "$(sd_state "$i")" "$(tr '\n' ' ' <"$out/$i")" "$LOGF" >&2
      tail -n 15 "$LOGF" 2>/dev/null | sed 's/^/   /' >&2 || true
    done
    rm -rf "$out"
    die "systemd hosts not ready within ${SD_WAIT_SECS}s or failing the checks: $(printf 's%s ' "${failed[@]}")"
  fi
  rm -rf "$out"
  local pid
  for i in "$@"; do
    pid=$(sd_pid "$i") || die "s$i: systemd-nspawn is gone"
    grep -q "/tend-${SD_STATE##*/}/s$i/" "/proc/$pid/cgroup" ||
      die "s$i: systemd-nspawn $pid is not in the host's own cgroup: $(tr '\n' ' ' <"/proc/$pid/cgroup")"
  done
  if (($# >= 2)); then check_isolation on_sd s "$1" "$2"; fi
}

# write_sd_files N: the same four files for s1..sN, in SD_FLEET.
write_sd_files() {
  write_host_files "$SD_FLEET" "$1" sd_vars sd_addr \
    "The tend systemd test hosts, written by tests/fleet/fleet.sh up-systemd $1. Do not edit."
}

take_sd_lock() {
  mkdir -p "$SD_FLEET"
  exec 9>"$SD_FLEET/.lock"
  flock -w 600 9 || die "another fleet.sh holds $SD_FLEET/.lock"
}

cmd_up_systemd() {
  local n=${1:-4} i t0 kept=() fresh=()
  if ! [[ $n =~ ^[1-9][0-9]*$ ]] || ((n > SD_MAX_HOSTS)); then
    die "up-systemd: N must be 1..$SD_MAX_HOSTS, got '$n'"
  fi
  t0=$(now_us)
  take_sd_lock
  ensure_sd_packages
  stop_distro_sshd
  ensure_sd_base
  ensure_client_key
  set_sd_ssh_opts
  # As for the chroot hosts: systemd hosts beyond N from an earlier, bigger
  # 'up-systemd' stay up, so runs asking for different sizes never take each
  # other's hosts away. `down-systemd` stops everything.
  for i in $(sd_configured_hosts); do
    if ((i > n)) && [ "$(sd_state "$i")" != down ]; then
      n=$i
    fi
  done
  for ((i = 1; i <= n; i++)); do
    sd_host_config "$i"
  done
  write_sd_files "$n"
  for ((i = 1; i <= n; i++)); do
    case $(sd_state "$i") in
    up) kept+=("s$i") ;;
    *)
      sd_check_port_free "$i"
      sd_kill "$i"
      sd_mount_root "$i" fresh
      sd_launch "$i"
      fresh+=("s$i")
      ;;
    esac
  done
  local all
  mapfile -t all < <(seq 1 "$n")
  sd_check_hosts "${all[@]}"
  say "up-systemd: s1..s$n booted and answer (${#fresh[@]} started fresh${fresh:+: ${fresh[*]}}; ${#kept[@]} already up) in $(elapsed "$t0")"
  say "inventory: $SD_FLEET/inventory.yaml  hosts: $SD_FLEET/hosts.tsv  ssh: ssh -F $SD_FLEET/ssh_config s1"
}

cmd_down_systemd() {
  local i t0 m
  t0=$(now_us)
  [ -d "$SD_FLEET" ] || {
    say "down-systemd: no systemd hosts in $SD_FLEET"
    return 0
  }
  take_sd_lock
  # In parallel: each container takes a second or two to power off.
  local pids=()
  for i in $(sd_configured_hosts); do
    sd_kill "$i" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || true; done
  local d
  for d in $(sd_cgroups 0); do rmdir "${d%/*}" 2>/dev/null || true; done
  [ -d "$SD_STATE" ] && umount_tree "$SD_STATE"
  m=$(awk -v s="$SD_STATE/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo)
  [ -z "$m" ] || die "down-systemd: still mounted: $m"
  say "down-systemd: every systemd host stopped and unmounted in $(elapsed "$t0") (keys, base and cache kept)"
}

cmd_status_systemd() {
  local i state pid any=
  printf 'name\taddress\tstate\tpid\n'
  [ -d "$SD_FLEET" ] || return 0
  for i in $(sd_configured_hosts); do
    any=1
    state=$(sd_state "$i")
    pid=$(sd_pid "$i") || pid=-
    printf 's%s\t%s\t%s\t%s\n' "$i" "$(sd_addr "$i")" "$state" "$pid"
  done
  [ -n "$any" ] || say "status-systemd: no systemd hosts in $SD_FLEET"
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
  if [ "$NET" != "$DEFAULT_NET" ]; then
    printf '%s\n' "$NET" >"$FLEET/net.tmp"
    mv -f "$FLEET/net.tmp" "$FLEET/net"
  fi
  ensure_packages
  stop_distro_sshd
  ensure_base
  ensure_client_key
  ensure_login_users
  set_ssh_opts
  # Hosts beyond N from an earlier, bigger 'up' stay up: the fleet is at
  # least h1..hN, so two test runs asking for different sizes never take
  # each other's hosts away. `down` stops everything.
  for i in $(configured_hosts); do
    if ((i > n)) && [ "$(host_state "$i")" != down ]; then
      n=$i
    fi
  done
  [ -z "$NETNS" ] || ensure_netns "$n"
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
  LAUNCH_DEADLINE=$(($(now_us) + WAIT_SECS * 1000000))
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
  remove_netns
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
  while "${NSX[@]}" ss -Hltn 'sport = :22' | awk '{print $4}' | grep -qxF "$a:22"; do sleep 0.02; done
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
  [ -z "$NETNS" ] || ensure_netns "$(configured_hosts | tail -n 1)"
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

cmd_forget_revisions() {
  # Each host's /run is a tmpfs of its own mount namespace (see ns_main):
  # enter it through the host's listener. A symlink planted at run/tend is
  # never followed.
  local i pid
  [ -d "$FLEET" ] || return 0
  for i in $(configured_hosts); do
    pid=$(listener_pid "$i") || continue
    host_vars "$i"
    nsenter -t "$pid" -m -- sh -c '[ -L "$1" ] || rm -f -- "$1/revision"' sh "$ROOT/run/tend" || true
  done
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  if [ "$cmd" = __ns ]; then
    ns_main "$1"
    return
  fi
  [ "$(id -u)" = 0 ] || die "run as root: it mounts, chroots and starts sshd on port 22"
  choose_net
  choose_netns
  case $cmd in
  up)
    [ $# -le 1 ] || usage
    cmd_up "$@"
    ;;
  down | status)
    [ $# -eq 0 ] || usage
    "cmd_$cmd"
    ;;
  forget-revisions)
    [ $# -eq 0 ] || usage
    cmd_forget_revisions
    ;;
  up-systemd)
    [ $# -le 1 ] || usage
    cmd_up_systemd "$@"
    ;;
  down-systemd | status-systemd)
    [ $# -eq 0 ] || usage
    "cmd_${cmd//-/_}"
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
