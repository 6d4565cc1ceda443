#!/usr/bin/env python3
"""The peer benchmark: tend, pyinfra and Ansible (with mitogen) on the same
chroot sshd hosts, the same workload per host, phases run alternately.

    python3 bench/peers/bench.py                  # N = 5 and 50, 3 repeats (as root)
    python3 bench/peers/bench.py --smoke          # 2 hosts, 1 repeat: that it runs

Workload per host (the same three ways): 20 files under /srv/app/conf/ whose
content names the host, 3 directories, 1 user with a home, 1 command guarded
by `creates`. Phases: plan / dry run on fresh hosts, first converge (fresh
hosts each time), no-op apply, plan / dry run on the converged hosts. Per
tool, phase and size: the median of the repeats of wall time, the tool's
own CPU and peak RSS (wait4 of its process tree), host-side CPU (a cgroup
around the whole bench fleet) and, from the hosts' sshd VERBOSE logs, SSH
connections and remote sessions per host.

The bench fleet is its own (fleet dir /var/tmp/tend-fleet-peers on
127.0.2.x): it never touches the test fleet. The peers are installed into a
throw-away virtualenv (/var/tmp/tend-bench-venv). Writes
bench/peers/results.csv (every run) and bench/RESULTS.md (the medians); with
--smoke, both under --out only.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLEET_SH = REPO / "tests/fleet/fleet.sh"
FLEET_DIR = Path(os.environ.get("TEND_BENCH_FLEET_DIR", "/var/tmp/tend-fleet-peers"))
FLEET_NET = os.environ.get("TEND_BENCH_FLEET_NET", "127.0.2")
VENV = Path(os.environ.get("TEND_BENCH_VENV", "/var/tmp/tend-bench-venv"))
PEERS = ["ansible-core==2.19.*", "mitogen==0.3.*", "pyinfra==3.*"]
CGROUP_NAME = "tend-bench-peers"
TOOLS = ["tend", "pyinfra", "ansible"]
PHASES = ["plan", "converge", "noop", "replan"]
FILES = 20


def say(*a):
    print("bench:", *a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# --- host-side CPU: a cgroup around the fleet's sshds -----------------------


class Cgroup:
    """cgroup v2 (cpu.stat usage_usec) or v1 (cpuacct.usage, ns)."""

    def __init__(self):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists():
            self.dir = Path("/sys/fs/cgroup") / CGROUP_NAME
            self.v2 = True
        else:
            self.dir = Path("/sys/fs/cgroup/cpuacct") / CGROUP_NAME
            self.v2 = False
        self.dir.mkdir(exist_ok=True)

    def usage_s(self):
        if self.v2:
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                if k == "usage_usec":
                    return int(v) / 1e6
            return 0.0
        return int((self.dir / "cpuacct.usage").read_text()) / 1e9

    def procs_file(self):
        return self.dir / "cgroup.procs"


# --- the bench fleet ----------------------------------------------------------


def fleet(args, cg=None):
    env = dict(os.environ, TEND_FLEET_DIR=str(FLEET_DIR), TEND_FLEET_NET=FLEET_NET)
    cmd = ["bash", str(FLEET_SH)] + args
    if cg is not None:
        # The fleet's sshds (and so every session) start inside the cgroup.
        cmd = ["sh", "-c", f'echo $$ > {cg.procs_file()} && exec "$@"', "sh"] + cmd
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench: fleet.sh {' '.join(args)} failed:\n{r.stderr}")


def fresh_fleet(n, cg):
    fleet(["down"])
    fleet(["up", str(n)], cg)
    hosts = []
    with open(FLEET_DIR / "hosts.tsv") as f:
        next(f)
        for line in f:
            name, addr, fp, _pid, log, _root = line.rstrip("\n").split("\t")
            if int(name[1:]) <= n:
                hosts.append({"name": name, "addr": addr, "fp": fp, "log": Path(log)})
    hosts.sort(key=lambda h: int(h["name"][1:]))
    return hosts


def log_counts(hosts):
    """(connections, sessions) per host so far, from sshd's VERBOSE log."""
    out = {}
    for h in hosts:
        conns = sessions = 0
        try:
            for line in h["log"].read_text(errors="replace").splitlines():
                if "Connection from" in line:
                    conns += 1
                elif "Starting session:" in line:
                    sessions += 1
        except FileNotFoundError:
            pass
        out[h["name"]] = (conns, sessions)
    return out


def on_host(h, script):
    key = FLEET_DIR / "id_ed25519"
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", f"UserKnownHostsFile={FLEET_DIR}/known_hosts",
         "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{h['addr']}", script],
        capture_output=True, text=True, timeout=30,
    )


def check_converged(hosts):
    """Every host has the workload: the tool really did it."""
    want = f"{FILES} 1 yes"
    for h in hosts:
        r = on_host(h, "ls /srv/app/conf | wc -l; id -u appuser >/dev/null && echo 1; "
                       "test -d /home/appuser && test -d /srv/app/data && test -e /srv/app/.init && echo yes")
        got = " ".join(r.stdout.split())
        if got != want:
            raise SystemExit(f"bench: {h['name']} is not converged ({got!r}, want {want!r}): {r.stderr}")


# --- the workload, three ways -------------------------------------------------


def content(host, i):
    return f"host {host} file {i:02d}\n"


def write_tend(d, hosts, key):
    d.mkdir(parents=True)
    (d / "tend.yaml").write_text(f"dispatch: enforced\nconcurrency: {max(16, len(hosts))}\n")
    inv = ["hosts:"]
    for h in hosts:
        inv += [f"  - name: {h['name']}", f"    address: {h['addr']}", f"    identity: {key}",
                f"    host_key: \"{h['fp']}\""]
    (d / "inventory.yaml").write_text("\n".join(inv) + "\n")
    (d / "hosts").mkdir()
    for h in hosts:
        r = ["resources:"]
        for p in ["/srv/app", "/srv/app/conf", "/srv/app/data"]:
            r += ["  - kind: directory", f"    path: {p}"]
        for i in range(1, FILES + 1):
            r += ["  - kind: file", f"    path: /srv/app/conf/f{i:02d}.conf",
                  f"    content: {json.dumps(content(h['name'], i))}"]
        r += ["  - kind: user", "    name: appuser", "    home: /home/appuser",
              "  - kind: command", "    name: init", "    run: echo init > /srv/app/.init",
              "    creates: /srv/app/.init"]
        (d / "hosts" / f"{h['name']}.yaml").write_text("\n".join(r) + "\n")


PYINFRA_DEPLOY = f'''
import io
from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.operations import files, server

for p in ["/srv/app", "/srv/app/conf", "/srv/app/data"]:
    files.directory(name="dir " + p, path=p, present=True)
for i in range(1, {FILES} + 1):
    files.put(
        name="file %02d" % i,
        src=io.StringIO("host %s file %02d\\n" % (host.name, i)),
        dest="/srv/app/conf/f%02d.conf" % i,
    )
server.user(name="appuser", user="appuser", home="/home/appuser", create_home=True)
if not host.get_fact(File, path="/srv/app/.init"):
    server.shell(name="init", commands=["echo init > /srv/app/.init"])
'''


def write_pyinfra(d, hosts, key):
    d.mkdir(parents=True)
    lines = ["hosts = ["]
    for h in hosts:
        lines.append(
            f"    ({h['name']!r}, {{'ssh_hostname': {h['addr']!r}, 'ssh_user': 'root', "
            f"'ssh_key': {str(key)!r}, 'ssh_known_hosts_file': {str(FLEET_DIR / 'known_hosts')!r}, "
            f"'ssh_strict_host_key_checking': 'yes'}}),")
    lines.append("]")
    (d / "inventory.py").write_text("\n".join(lines) + "\n")
    (d / "deploy.py").write_text(PYINFRA_DEPLOY)


def write_ansible(d, hosts, key):
    d.mkdir(parents=True)
    inv = ["[app]"]
    for h in hosts:
        inv.append(f"{h['name']} ansible_host={h['addr']}")
    inv += ["", "[app:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={key}",
            f"ansible_ssh_common_args='-o UserKnownHostsFile={FLEET_DIR}/known_hosts'",
            "ansible_python_interpreter=/usr/bin/python3"]
    (d / "inventory.ini").write_text("\n".join(inv) + "\n")
    site = subprocess.run([str(VENV / "bin/python"), "-c",
                           "import ansible_mitogen, os; print(os.path.dirname(ansible_mitogen.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (d / "ansible.cfg").write_text(
        "[defaults]\n"
        f"strategy_plugins = {site}/plugins/strategy\n"
        "strategy = mitogen_linear\n"
        f"forks = {max(5, len(hosts))}\n"
        "host_key_checking = True\n"
        "gathering = explicit\n"
        "retry_files_enabled = False\n"
        "deprecation_warnings = False\n")
    (d / "site.yml").write_text(f"""- hosts: app
  tasks:
    - file: {{path: "{{{{ item }}}}", state: directory}}
      loop: [/srv/app, /srv/app/conf, /srv/app/data]
    - copy:
        dest: "/srv/app/conf/f{{{{ '%02d' % item }}}}.conf"
        content: "host {{{{ inventory_hostname }}}} file {{{{ '%02d' % item }}}}\\n"
      loop: "{{{{ range(1, {FILES + 1}) | list }}}}"
    - user: {{name: appuser, home: /home/appuser, create_home: true}}
    - command: {{cmd: "sh -c 'echo init > /srv/app/.init'", creates: /srv/app/.init}}
""")


def commands(tool, d, tend_bin, phase):
    """plan: a dry run on fresh hosts (everything to do); converge, noop: a
    real run; replan: a dry run on the converged hosts."""
    if phase == "replan":
        phase = "plan"
    if tool == "tend":
        base = [str(tend_bin), "--dir", str(d)]
        return base + (["plan"] if phase == "plan" else ["apply", "--dispatch", "enforced"])
    if tool == "pyinfra":
        c = [str(VENV / "bin/pyinfra"), "inventory.py", "deploy.py", "--yes", "--parallel", "100"]
        return c + (["--dry"] if phase == "plan" else [])
    c = [str(VENV / "bin/ansible-playbook"), "-i", "inventory.ini", "site.yml"]
    return c + (["--check"] if phase == "plan" else [])


def measure(cmd, cwd, env, cg, hosts, ok_codes):
    before_cpu = cg.usage_s()
    before_logs = log_counts(hosts)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_fds = [0]
    done = threading.Event()

    def sample():
        # The tool's own open file descriptors, every 20 ms while it runs
        # (never p.poll(): that would reap the child before wait4 does).
        while not done.is_set():
            try:
                peak_fds[0] = max(peak_fds[0], len(os.listdir(f"/proc/{p.pid}/fd")))
            except OSError:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    done.set()
    sampler.join(timeout=1)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code not in ok_codes:
        tail = out.decode(errors="replace")[-3000:]
        raise SystemExit(f"bench: {' '.join(cmd)} exited {code}:\n{tail}")
    # sshd may log a session's end a little after the client is gone.
    time.sleep(0.3)
    host_cpu = cg.usage_s() - before_cpu
    after = log_counts(hosts)
    n = len(hosts)
    conns = sum(after[h][0] - before_logs[h][0] for h in after) / n
    sess = sum(after[h][1] - before_logs[h][1] for h in after) / n
    return {
        "wall_s": wall,
        "tool_cpu_s": ru.ru_utime + ru.ru_stime,
        "host_cpu_s": host_cpu,
        "host_cpu_per_host_s": host_cpu / n,
        "peak_rss_mb": ru.ru_maxrss / 1024,
        "ssh_conns_per_host": conns,
        "sessions_per_host": sess,
        "peak_fds": peak_fds[0],
    }


def metric_sum(port, name):
    """The sum of every sample of counter `name` at tend's /metrics."""
    import urllib.request
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def proc_stat(pid):
    """(CPU seconds, VmRSS MB, VmHWM MB, threads, open fds) of a process."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    st = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        st[k] = v.split()
    return (cpu, int(st["VmRSS"][0]) / 1024, int(st["VmHWM"][0]) / 1024,
            int(st["Threads"][0]), len(os.listdir(f"/proc/{pid}/fd")))


def measure_resync(d, tend_bin, cg, hosts, rounds=5):
    """`tend run` over the converged hosts: the resyncs after the first pass
    run on warm connections. Per round of one resync per host: the span
    from the first to the last host's reconcile, host CPU per host,
    sessions per host, tend's CPU; tend's RSS, threads and fds after."""
    n = len(hosts)
    port = 19000 + n
    (d / "tend.yaml").write_text((d / "tend.yaml").read_text() + "resync: 2s\n")
    p = subprocess.Popen([str(tend_bin), "--dir", str(d), "run", "--listen", f"127.0.0.1:{port}"],
                         cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def reconciles():
            try:
                return metric_sum(port, "tend_reconciles_total")
            except OSError:
                return -1.0
        deadline = time.monotonic() + 120
        while reconciles() < n:
            if time.monotonic() > deadline or p.poll() is not None:
                raise SystemExit("bench: tend run did not finish its first pass")
            time.sleep(0.05)
        spans = []
        r0 = reconciles()
        c0, logs0, t0 = cg.usage_s(), log_counts(hosts), proc_stat(p.pid)[0]
        for k in range(rounds):
            base = r0 + k * n
            while reconciles() <= base:
                time.sleep(0.005)
            first = time.monotonic()
            while reconciles() < base + n:
                time.sleep(0.005)
            spans.append(time.monotonic() - first)
        time.sleep(0.3)
        cpu, rss, hwm, threads, fds = proc_stat(p.pid)
        host_cpu = cg.usage_s() - c0
        after = log_counts(hosts)
        sess = sum(after[h][1] - logs0[h][1] for h in after) / n / rounds
        conns = sum(after[h][0] - logs0[h][0] for h in after) / n / rounds
        return {"wall_s": statistics.median(spans), "tool_cpu_s": (cpu - t0) / rounds,
                "host_cpu_s": host_cpu / rounds, "host_cpu_per_host_s": host_cpu / rounds / n,
                "peak_rss_mb": hwm, "ssh_conns_per_host": conns, "sessions_per_host": sess,
                "rss_mb": rss, "threads": threads, "fds": fds}
    finally:
        p.terminate()
        p.wait(timeout=30)


def bench_hash_cache(tend_bin, files, out_md):
    """One host with FILES files of 1 MiB each: host CPU and wall of a no-op
    `tend apply` that hashes every file (no cache yet) and of one that finds
    them all in the host's hash cache."""
    cg = Cgroup()
    hosts = fresh_fleet(1, cg)
    key = FLEET_DIR / "id_ed25519"
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-hashcache-") as tmp:
            d = Path(tmp) / "w"
            write_tend(d, hosts, key)
            (d / "files").mkdir()
            (d / "files/blob").write_bytes(os.urandom(1 << 20))
            r = ["resources:", "  - kind: directory", "    path: /srv/big"]
            for i in range(files):
                r += ["  - kind: file", f"    path: /srv/big/f{i:05d}", "    source: blob"]
            (d / "hosts" / f"{hosts[0]['name']}.yaml").write_text("\n".join(r) + "\n")
            env = dict(os.environ)
            env.pop("SSH_AUTH_SOCK", None)
            cmd = [str(tend_bin), "--dir", str(d), "apply", "--dispatch", "enforced"]
            say(f"hash cache: writing {files} files of 1 MiB to {hosts[0]['name']}")
            measure(cmd, d, env, cg, hosts, {0})
            # The cache trusts no entry within a second of its own write.
            time.sleep(1.5)
            for label in ["no-op apply, every file hashed (the cache is written)",
                          "no-op apply, from the cache", "no-op apply, from the cache"]:
                m = measure(cmd, d, env, cg, hosts, {0})
                rows.append((label, m))
                say(f"{label}: wall {m['wall_s']:.2f}s, host cpu {m['host_cpu_s'] * 1000:.0f}ms")
                time.sleep(1.5)
            plan = [str(tend_bin), "--dir", str(d), "plan"]
            m = measure(plan, d, env, cg, hosts, {0})
            rows.append(("plan, from the cache", m))
    finally:
        fleet(["down"])
    lines = ["# The host's hash cache", "",
             f"Run on {datetime.date.today().isoformat()}: {machine()}. One chroot sshd host with "
             f"{files} files of 1 MiB under /srv/big (one `file` resource each). Reproduce: "
             f"`sudo python3 bench/peers/bench.py --hash-cache {files}` after `cargo build --release`.", "",
             "| run | wall | host CPU | tend CPU |", "|---|---|---|---|"]
    for label, m in rows:
        lines.append(f"| {label} | {m['wall_s']:.2f} s | {m['host_cpu_s'] * 1000:.0f} ms | {m['tool_cpu_s']:.2f} s |")
    md = "\n".join(lines) + "\n"
    Path(out_md).write_text(md)
    print(md)


def ensure_venv(tools):
    peers = [t for t in tools if t != "tend"]
    if not peers:
        return
    stamp = VENV / ".tend-bench-requirements"
    want = "\n".join(PEERS)
    if stamp.exists() and stamp.read_text() == want:
        return
    say(f"installing {', '.join(PEERS)} into {VENV}")
    shutil.rmtree(VENV, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(VENV)])
    run([str(VENV / "bin/pip"), "install", "-q", "--disable-pip-version-check"] + PEERS)
    stamp.write_text(want)


def versions(tend_bin, tools):
    v = {"tend": subprocess.run([str(tend_bin), "version"], capture_output=True, text=True).stdout.strip()}
    if "pyinfra" in tools:
        v["pyinfra"] = subprocess.run([str(VENV / "bin/pyinfra"), "--version"], capture_output=True,
                                      text=True).stdout.strip()
    if "ansible" in tools:
        a = subprocess.run([str(VENV / "bin/ansible"), "--version"], capture_output=True, text=True).stdout
        v["ansible"] = a.splitlines()[0] if a else "?"
        m = subprocess.run([str(VENV / "bin/pip"), "show", "mitogen"], capture_output=True, text=True).stdout
        v["mitogen"] = next((l.split(":", 1)[1].strip() for l in m.splitlines() if l.startswith("Version")), "?")
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    v["openssh"] = (ssh.stderr or ssh.stdout).strip()
    return v


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem} RAM, Linux {platform.release()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5,50")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--tend", default=str(REPO / "target/release/tend"), help="the tend binary")
    ap.add_argument("--out", default=str(REPO / "bench/peers"), help="where results.csv goes")
    ap.add_argument("--smoke", action="store_true", help="2 hosts, 1 repeat; no RESULTS.md")
    ap.add_argument("--hash-cache", type=int, metavar="FILES",
                    help="tend alone: no-op applies of FILES files of 1 MiB with and without the host's hash cache; writes bench/HASH-CACHE.md")
    ap.add_argument("--scale", type=int, metavar="N",
                    help="tend alone on N hosts (up to 500, on 127.1.x), 1 repeat; writes bench/SCALE.md")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root: it starts the bench fleet (tests/fleet/fleet.sh)")
    sizes = [2] if a.smoke else [int(s) for s in a.sizes.split(",")]
    repeat = 1 if a.smoke else a.repeat
    tools = a.tools.split(",")
    if a.scale:
        global FLEET_DIR, FLEET_NET
        FLEET_DIR = Path(os.environ.get("TEND_BENCH_SCALE_DIR", "/var/tmp/tend-fleet-500"))
        FLEET_NET = os.environ.get("TEND_BENCH_SCALE_NET", "127.1.0")
        sizes, repeat, tools = [a.scale], 1, ["tend"]
    tend_bin = Path(a.tend).resolve()
    if not tend_bin.exists():
        raise SystemExit(f"bench: no tend binary at {tend_bin}: cargo build --release (or --tend PATH)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.hash_cache:
        bench_hash_cache(tend_bin, a.hash_cache, REPO / "bench/HASH-CACHE.md")
        return
    ensure_venv(tools)
    cg = Cgroup()
    key = FLEET_DIR / "id_ed25519"
    env = dict(os.environ, ANSIBLE_CONFIG="ansible.cfg", PYTHONUNBUFFERED="1")
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("TEND_DISPATCH", None)
    rows = []
    try:
        for n in sizes:
            for r in range(repeat):
                # Alternate: each repeat starts with the next tool.
                order = tools[r % len(tools):] + tools[:r % len(tools)]
                for tool in order:
                    hosts = fresh_fleet(n, cg)
                    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-") as tmp:
                        d = Path(tmp) / "w"
                        {"tend": write_tend, "pyinfra": write_pyinfra, "ansible": write_ansible}[tool](d, hosts, key)
                        for phase in PHASES:
                            # tend plan exits 2 with changes pending.
                            ok = {0, 2} if (tool == "tend" and phase == "plan") else {0}
                            m = measure(commands(tool, d, tend_bin, phase), d, env, cg, hosts, ok)
                            if phase == "converge":
                                check_converged(hosts)
                            row = {"tool": tool, "hosts": n, "phase": phase, "repeat": r + 1, **m}
                            rows.append(row)
                            say(f"{tool:8} n={n:<3} {phase:9} r{r + 1}: wall {m['wall_s']:.2f}s, "
                                f"tool cpu {m['tool_cpu_s']:.2f}s, host cpu/host {m['host_cpu_per_host_s'] * 1000:.0f}ms, "
                                f"rss {m['peak_rss_mb']:.0f}MB, conns/host {m['ssh_conns_per_host']:.1f}, "
                                f"sessions/host {m['sessions_per_host']:.1f}")
                        if tool == "tend":
                            m = measure_resync(d, tend_bin, cg, hosts)
                            rows.append({"tool": tool, "hosts": n, "phase": "resync", "repeat": r + 1, **m})
                            say(f"tend     n={n:<3} resync    r{r + 1}: span {m['wall_s']:.3f}s, "
                                f"host cpu/host {m['host_cpu_per_host_s'] * 1000:.1f}ms, "
                                f"sessions/host {m['sessions_per_host']:.2f}, rss {m['rss_mb']:.0f}MB "
                                f"(peak {m['peak_rss_mb']:.0f}MB), threads {m['threads']}, fds {m['fds']}")
    finally:
        fleet(["down"])
    with open(out / "results.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    md = report(rows, sizes, tools, versions(tend_bin, tools), repeat)
    if a.scale:
        md = md.replace("# Peer benchmark", f"# Scale: tend alone on {a.scale} hosts", 1)
        md = md.replace("tools alternating, fresh hosts for each tool", "fresh hosts", 1)
        md = md.replace("Reproduce: `sudo python3 bench/peers/bench.py`",
                        f"Reproduce: `sudo python3 bench/peers/bench.py --scale {a.scale}`", 1)
        (REPO / "bench/SCALE.md").write_text(md)
    elif a.smoke:
        (out / "RESULTS.md").write_text(md)
    else:
        (REPO / "bench/RESULTS.md").write_text(md)
    print(md)


def report(rows, sizes, tools, vers, repeat):
    def med(tool, n, phase, key):
        v = [r[key] for r in rows if r["tool"] == tool and r["hosts"] == n and r["phase"] == phase]
        return statistics.median(v) if v else None

    names = {"plan": "plan / dry run, fresh hosts", "converge": "first converge",
             "noop": "no-op apply", "replan": "plan / dry run, converged"}
    peers = [t for t in tools if t != "tend"]
    lines = [
        "# Peer benchmark",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine()}. Medians of {repeat} run(s), "
        "tools alternating, fresh hosts for each tool (chroot sshd hosts of tests/fleet/fleet.sh, "
        "on loopback). Reproduce: `sudo python3 bench/peers/bench.py` after `cargo build --release`.",
        "",
        "Versions: " + "; ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "Workload per host: 20 files under /srv/app/conf/ naming the host, 3 directories, 1 user "
        "with a home, 1 command guarded by `creates`. Wall time in seconds; ratios are the peer's "
        "median wall over tend's.",
        "",
    ]
    head = "| phase | hosts | " + " | ".join(tools) + " | " + " | ".join(f"vs {p}" for p in peers) + " |"
    lines += [head, "|" + "---|" * (2 + len(tools) + len(peers))]
    for n in sizes:
        for ph in PHASES:
            walls = {t: med(t, n, ph, "wall_s") for t in tools}
            cells = [f"{walls[t]:.2f} s" if walls[t] is not None else "-" for t in tools]
            ratios = []
            for p in peers:
                if walls.get("tend") and walls.get(p):
                    ratios.append(f"{walls[p] / walls['tend']:.1f}x")
                else:
                    ratios.append("-")
            lines.append(f"| {names[ph]} | {n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Per run, medians: the tool's own CPU and peak RSS, host-side CPU per host, "
              "SSH connections and remote sessions (commands, sftp) per host.", "",
              "| tool | phase | hosts | tool CPU | peak RSS | peak fds | host CPU / host | connections / host | sessions / host |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for ph in PHASES:
            for t in tools:
                if med(t, n, ph, "wall_s") is None:
                    continue
                lines.append(
                    f"| {t} | {names[ph]} | {n} | {med(t, n, ph, 'tool_cpu_s'):.2f} s | "
                    f"{med(t, n, ph, 'peak_rss_mb'):.0f} MB | {med(t, n, ph, 'peak_fds'):.0f} | "
                    f"{med(t, n, ph, 'host_cpu_per_host_s') * 1000:.0f} ms | "
                    f"{med(t, n, ph, 'ssh_conns_per_host'):.1f} | {med(t, n, ph, 'sessions_per_host'):.1f} |")
    if any(r["phase"] == "resync" for r in rows):
        lines += ["", "tend only: `tend run` over the converged hosts, `resync: 2s`, five rounds after "
                  "the first pass (warm connections). Span: from the first to the last host's reconcile "
                  "of one round; host CPU and sessions per host per round; tend's CPU per round; tend's "
                  "RSS, peak RSS, threads and open fds after the rounds.", "",
                  "| hosts | span | host CPU / host | sessions / host | connections / host | tend CPU | RSS | peak RSS | threads | fds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n in sizes:
            if med("tend", n, "resync", "wall_s") is None:
                continue
            g = lambda k: med("tend", n, "resync", k)  # noqa: E731
            lines.append(f"| {n} | {g('wall_s'):.3f} s | {g('host_cpu_per_host_s') * 1000:.1f} ms | "
                         f"{g('sessions_per_host'):.2f} | {g('ssh_conns_per_host'):.2f} | {g('tool_cpu_s'):.3f} s | "
                         f"{g('rss_mb'):.0f} MB | {g('peak_rss_mb'):.0f} MB | {g('threads'):.0f} | {g('fds'):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
