"""A test cluster of real hosts: one network namespace per node.

Each node is a real ``clustersearch worker`` in a network namespace of its
own, with its own address on a bridge (veth pairs), reaching the broker over
that network the way a board on a shelf reaches ``pine0``. RabbitMQ and Redis
listen on 127.0.0.1 only, so a TCP forwarder of ours (``_tcpproxy.py``) listens
on the bridge's host address and passes connections on. RabbitMQ's ``guest``
account is loopback-only, so the cluster gets a user and a virtual host of its
own, created as README tells users to.

Faults are injected the way they happen on a shelf of boards: SIGKILL of a
pool process or of a whole node, a link cut (``ip link set ... down``), a
broker restart (``rabbitmqctl stop_app``/``start_app``), a node joining late,
and a node much slower than the rest (a CPU quota, cgroup v2 or v1).
With ``memory_cgroups=True`` each node runs in a memory cgroup of its own
(cgroup v2 ``memory.max``, or v1 ``memory.limit_in_bytes`` where the memory
controller is on v1), a board with that much memory and no swap.

Everything it creates carries a random token in its name and is listed in a
state file under ``/run/clustersearch-netcluster``; :meth:`NetCluster.close`
removes it all, and the next run reaps what a killed run left behind.

Needs root, iproute2, ``rabbitmqctl``, and RabbitMQ and Redis on 127.0.0.1.
"""

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from clustersearch import Cluster

STATE_DIR = Path("/run/clustersearch-netcluster")
PROXY = Path(__file__).with_name("_tcpproxy.py")
RABBITMQ_PORT = 5672
REDIS_PORT = 6379
REDIS_DB = 7  # results: a database of its own (the benchmarks use 3)
# Redis as the broker: a database no other test uses (its queues are named
# after the hosts, and a killed node leaves unacknowledged messages there).
REDIS_BROKER_DB = 12
BROKERS = ("rabbitmq", "redis")

# Run by ``python -c`` in place of ``python -m clustersearch``: a node that
# says it has clustersearch ``sys.argv[1]`` (a node of another release).
_OTHER_VERSION = """
import importlib, pkgutil, runpy, sys
import clustersearch
for found in pkgutil.walk_packages(clustersearch.__path__, "clustersearch."):
    if not found.name.endswith("__main__"):
        importlib.import_module(found.name)
for name, module in list(sys.modules.items()):
    if name.partition(".")[0] == "clustersearch" and hasattr(module, "__version__"):
        module.__version__ = sys.argv[1]
sys.argv = ["clustersearch", *sys.argv[2:]]
runpy.run_module("clustersearch", run_name="__main__", alter_sys=True)
"""

# Measured detection and recovery times, one line per fault test; conftest
# prints them at the end of the run.
REPORT = []


def _run(*cmd, check=True, timeout=60):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def why_unavailable():
    """Why this machine cannot run the test cluster, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the multi-host test cluster needs root (network namespaces, cgroups)"
    for tool in ("ip", "rabbitmqctl"):
        if shutil.which(tool) is None:
            return f"the multi-host test cluster needs {tool!r} on PATH"
    probe = f"csprobe{os.getpid()}"
    proc = _run("ip", "netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid):
    """When process ``pid`` started (clock ticks after boot), None if gone.

    A pid and its start time name one process: a pid read from an old state
    file may belong to another process by now (pids are reused).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, TypeError, ValueError):
        return None
    # Field 22; the command name (field 2) may hold spaces, so count after it.
    return int(stat.rpartition(")")[2].split()[19])


def _identity(pid):
    """``[pid, start time]`` for a state file."""
    return [pid, _start_time(pid)]


def _same_process(identity):
    """Whether ``[pid, start time]`` still names a running process."""
    if not isinstance(identity, list) or len(identity) != 2 or identity[1] is None:
        return False  # nothing to check it against: never signal it
    pid, started = identity
    return _start_time(pid) == started


def _kill_recorded(identity, *, group=False):
    """SIGKILL the process a state file recorded, only if it is still that one."""
    if not _same_process(identity):
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(identity[0], signal.SIGKILL)
        else:
            os.kill(identity[0], signal.SIGKILL)


def child_pids(pid):
    """The pids of a process's children (a node's pool processes)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _free_subnet():
    used = _run("ip", "-4", "-o", "addr", "show").stdout
    for k in range(256):
        net = ipaddress.ip_network(f"10.231.{k}.0/24")
        if f" 10.231.{k}." not in used:
            return net
    raise RuntimeError("no free /24 in 10.231.0.0/16 for the test cluster")


class _CpuQuota:
    """A cgroup with a CPU quota (cgroup v2 ``cpu.max`` or v1 CFS quota)."""

    def __init__(self, name, fraction):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        period = 100_000
        quota = max(1000, int(period * fraction))
        if v2.exists() and "cpu" in v2.read_text().split():
            root = Path("/sys/fs/cgroup")
            control = root / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                control.write_text("+cpu")
            self.path = root / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {period}")
        elif v1.exists():
            root = v1.parent
            self.path = root / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            raise RuntimeError("no cgroup CPU controller (v2 cpu.max or v1 cpu)")
        self.root = root

    def add(self, pid):
        with contextlib.suppress(ProcessLookupError, OSError):
            (self.path / "cgroup.procs").write_text(str(pid))

    @staticmethod
    def remove(path):
        _remove_cgroup(path)


def _remove_cgroup(path):
    """Remove cgroup ``path``; what still runs in it goes to its parent first."""
    path = Path(path)
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (path.parent / "cgroup.procs").write_text(pid)
    for _ in range(50):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def _own_cgroup_v1(controller):
    """This process's cgroup in the v1 hierarchy of ``controller`` (a path)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup", controller) / path.lstrip("/")
    return Path("/sys/fs/cgroup", controller)


class MemoryCgroup:
    """A cgroup with a memory limit and no swap: a board with that much memory.

    cgroup v2 (``memory.max``, ``memory.swap.max`` 0, ``memory.peak``,
    ``memory.events``) where the unified hierarchy has the memory
    controller; else v1 (``memory.limit_in_bytes`` and
    ``memory.memsw.limit_in_bytes``, ``memory.max_usage_in_bytes``,
    ``memory.oom_control``), created inside this process's own memory
    cgroup. No limit until :meth:`limit`.
    """

    def __init__(self, name):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        v1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        if v2.exists() and "memory" in v2.read_text().split():
            root = Path("/sys/fs/cgroup")
            control = root / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")
            self.version = 2
        elif v1.exists():
            root = _own_cgroup_v1("memory")
            self.version = 1
        else:
            raise RuntimeError(
                "no cgroup memory controller: neither /sys/fs/cgroup/cgroup.controllers "
                "lists 'memory' (v2) nor is /sys/fs/cgroup/memory mounted (v1)"
            )
        self.path = root / name
        self.path.mkdir(exist_ok=True)
        if self.version == 2:
            (self.path / "memory.swap.max").write_text("0")

    def _read(self, name):
        return (self.path / name).read_text()

    def limit(self, nbytes):
        """Limit the group's memory to ``nbytes`` (no swap)."""
        if self.version == 2:
            (self.path / "memory.max").write_text(str(int(nbytes)))
            return
        # v1: memory+swap may not be below memory; no swap = both the same.
        memsw = self.path / "memory.memsw.limit_in_bytes"
        order = ["memory.limit_in_bytes", memsw.name]
        if int(nbytes) > int(self._read("memory.limit_in_bytes")):
            order.reverse()
        for name in order:
            if (self.path / name).exists():
                (self.path / name).write_text(str(int(nbytes)))

    @property
    def max_bytes(self):
        """The limit in bytes (None: none)."""
        text = self._read("memory.max" if self.version == 2 else "memory.limit_in_bytes").strip()
        return None if text == "max" or int(text) >= 2**62 else int(text)

    def usage(self):
        return int(self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes"))

    def peak(self):
        """The most memory the group used since it was created (page cache included)."""
        return int(self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"))

    def oom_kills(self):
        """Processes of the group the kernel's OOM killer killed."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in self._read(name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def unreclaimable(self):
        """Bytes the group uses now that the kernel cannot reclaim without
        swap: anonymous memory and shared memory (not the page cache of
        files, which it drops under the limit)."""
        stat = self.stat()
        if self.version == 2:
            return stat["anon"] + stat["shmem"]
        return stat["total_rss"] + stat["total_shmem"]

    def stat(self):
        """``memory.stat`` as a dict of ints."""
        return {k: int(v) for k, v in (line.split() for line in self._read("memory.stat").splitlines())}

    def pids(self):
        return [int(p) for p in self._read("cgroup.procs").split()]

    def wrap(self, cmd):
        """``cmd`` started inside this group (with everything it forks)."""
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]

    @staticmethod
    def remove(path):
        _remove_cgroup(path)


class NetCluster:
    """Nodes in network namespaces, a forwarder to the broker, and faults.

    Parameters
    ----------
    workdir : path
        Node logs and the fits' marker files.
    n_hosts : int
        Network namespaces to create (hosts); nodes start on the first
        ``n_nodes`` of them, the others are free for nodes that join later.
    n_nodes : int
    backend : {"redis", "rpc"}
        The result backend of the nodes and of :meth:`cluster`.
    broker : {"rabbitmq", "redis"}
        The broker of the nodes and of :meth:`cluster` (a RabbitMQ virtual
        host of this cluster's own, or Redis database ``REDIS_BROKER_DB``);
        :meth:`reset` switches it.
    memory_cgroups : bool, default=False
        Run each node in a :class:`MemoryCgroup` of its own (``memory[host]``),
        kept for the cluster's life (a restarted node goes back into it); no
        limit until :meth:`limit_memory`.
    """

    def __init__(
        self, workdir, *, n_hosts=4, n_nodes=3, backend="redis", broker="rabbitmq",
        memory_cgroups=False,
    ):  # fmt: skip
        if broker not in BROKERS:
            raise ValueError(f"broker must be one of {BROKERS}, not {broker!r}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.markers = self.workdir / "markers"
        self.markers.mkdir(exist_ok=True)
        self.token = secrets.token_hex(2)
        self.n_hosts = n_hosts
        self.n_nodes = n_nodes
        self.backend_kind = backend
        self.broker_kind = broker
        self.used_redis_broker = False
        self.bridge = f"csbr{self.token}"
        self.hosts = [f"host{i + 1}" for i in range(n_hosts)]
        self.netns = {h: f"cs{self.token}{h}" for h in self.hosts}
        self.veth = {h: f"csv{self.token}n{i + 1}" for i, h in enumerate(self.hosts)}
        self.user = f"cs-{self.token}"
        self.vhost = f"cs-{self.token}"
        self.password = secrets.token_hex(16)  # never starts with "-"
        # Work and results are signed, as README tells users to off loopback.
        self.secret = secrets.token_hex(32)
        self.secret_file = self.workdir / "secret"
        self.secret_file.write_text(self.secret)
        self.secret_file.chmod(0o600)
        self.procs = {}
        self.cgroups = {}
        self.memory_cgroups = memory_cgroups
        self.memory = {}  # host -> MemoryCgroup
        self.dirty = set()  # hosts whose node a fault touched
        self.broker_stopped = False
        self._proxy = None
        self._state = STATE_DIR / f"{self.token}.json"
        self.subnet = None
        self.gateway = None

    # -- set up and tear down ------------------------------------------------

    def start(self):
        reap_leftovers()
        try:
            self._write_state()
            self._create_network()
            self._write_state()
            self._create_broker_account()
            self._start_proxy()
            for host in self.hosts[: self.n_nodes]:
                self.start_node(host, wait=False)
            self.wait_for(self.hosts[: self.n_nodes])
        except BaseException:
            self.close()
            raise
        return self

    def _write_state(self):
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            # Bare pids for readers of the older format; the identities
            # (pid, start time) are what reap_leftovers checks and kills.
            "pid": os.getpid(),
            "run": _identity(os.getpid()),
            "bridge": self.bridge,
            "netns": list(self.netns.values()),
            "veth": list(self.veth.values()),
            "user": self.user,
            "vhost": self.vhost,
            "cgroups": [str(c.path) for c in [*self.cgroups.values(), *self.memory.values()]],
            "node_pids": [p.pid for p in self.procs.values()],
            "proxy_pid": self._proxy.pid if self._proxy else None,
            "nodes": [_identity(p.pid) for p in self.procs.values()],
            "proxy": _identity(self._proxy.pid) if self._proxy else None,
            "broker_stopped": self.broker_stopped,
        }
        self._state.write_text(json.dumps(state))

    def _create_network(self):
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        prefix = self.subnet.prefixlen
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.addresses = {}
        for i, host in enumerate(self.hosts):
            ns, veth, peer = self.netns[host], self.veth[host], f"csp{self.token}n{i + 1}"
            address = str(hosts[9 + i])
            self.addresses[host] = address
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
            inside = ("ip", "netns", "exec", ns, "ip")
            _run(*inside, "link", "set", "lo", "up")
            _run(*inside, "link", "set", peer, "name", "eth0")
            _run(*inside, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            _run(*inside, "link", "set", "eth0", "up")
            _run(*inside, "route", "add", "default", "via", self.gateway)

    def _create_broker_account(self):
        _run("rabbitmqctl", "-q", "add_vhost", self.vhost)
        _run("rabbitmqctl", "-q", "add_user", self.user, self.password)
        _run("rabbitmqctl", "-q", "set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def _start_proxy(self):
        self._proxy = subprocess.Popen(
            [
                sys.executable, str(PROXY),
                f"{self.gateway}:{RABBITMQ_PORT}=127.0.0.1:{RABBITMQ_PORT}",
                f"{self.gateway}:{REDIS_PORT}=127.0.0.1:{REDIS_PORT}",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        line = self._proxy.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the TCP forwarder did not start: {line}{self._proxy.stdout.read()}")
        self._write_state()

    def close(self):
        """Remove everything: nodes, forwarder, cgroups, namespaces, bridge, account."""
        errors = []

        def attempt(func, *args):
            try:
                func(*args)
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{getattr(func, '__name__', func)}{args}: {exc!r}")

        if self.broker_stopped:
            attempt(self.start_broker)
        for host in list(self.procs):
            attempt(self.kill_node, host)
        if self._proxy is not None:
            attempt(_stop_process, self._proxy)
            self._proxy = None
        for host in list(self.cgroups):
            attempt(_CpuQuota.remove, self.cgroups.pop(host).path)
        for host in list(self.memory):
            attempt(MemoryCgroup.remove, self.memory.pop(host).path)
        if self.used_redis_broker:
            attempt(_flush_redis_broker)
        _teardown(
            {"bridge": self.bridge, "netns": list(self.netns.values()),
             "veth": list(self.veth.values()), "user": self.user, "vhost": self.vhost},
            errors,
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            self._state.unlink()
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()  # only when no other run's state is left
        if errors:
            raise RuntimeError("test cluster teardown: " + "; ".join(errors))

    # -- URLs and the client ----------------------------------------------------

    def broker_url(self, host_side=True):
        """The broker as the client (host side) or as a node sees it."""
        address = "127.0.0.1" if host_side else self.gateway
        if self.broker_kind == "redis":
            return f"redis://{address}:{REDIS_PORT}/{REDIS_BROKER_DB}"
        return f"amqp://{self.user}:{self.password}@{address}:{RABBITMQ_PORT}/{self.vhost}"

    def backend_url(self, host_side=True):
        if self.backend_kind == "rpc":
            return "rpc://"
        address = "127.0.0.1" if host_side else self.gateway
        return f"redis://{address}:{REDIS_PORT}/{REDIS_DB}"

    def cluster(self, **kwargs):
        """A client's handle on this cluster (from the host, like a laptop)."""
        return Cluster(self.broker_url(), self.backend_url(), secret=self.secret, **kwargs)

    # -- nodes --------------------------------------------------------------------

    def start_node(self, host, *, wait=True, version=None):
        """Start a node on ``host``; ``version``: the clustersearch version it
        reports, for a node of another release (None: this one's)."""
        if version is None:
            run_cli = [sys.executable, "-m", "clustersearch"]
        else:
            run_cli = [sys.executable, "-c", _OTHER_VERSION, version]
        if self.broker_kind == "redis":
            self.used_redis_broker = True
        cmd = [
            "ip", "netns", "exec", self.netns[host],
            # A host name of its own, too (a UTS namespace): node info, and
            # what clustersearch decides from it, see another machine.
            "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', host,
            *run_cli, "worker",
            "--broker", self.broker_url(host_side=False),
            "--backend", self.backend_url(host_side=False),
            "--name", host, "--concurrency", "1", "--threads-per-process", "1",
            "--loglevel", "WARNING", "--allow-root",
            "--secret-file", str(self.secret_file),
        ]  # fmt: skip
        if self.memory_cgroups:
            if host not in self.memory:
                self.memory[host] = MemoryCgroup(f"clustersearch-{self.token}-{host}-mem")
                self._write_state()  # recorded before anything runs in it
            cmd = self.memory[host].wrap(cmd)
        env = dict(os.environ)
        env["CLUSTERSEARCH_TEST_MARKERS"] = str(self.markers)
        with open(self.workdir / f"{host}.log", "ab") as log:
            self.procs[host] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._write_state()
        if wait:
            self.wait_for([host])

    def wait_for(self, hosts, timeout=60):
        """Wait until every node in ``hosts`` answers on the broker."""
        deadline = time.monotonic() + timeout
        with self.cluster() as probe:
            while True:
                for host in hosts:
                    proc = self.procs.get(host)
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(
                            f"node {host!r} exited with {proc.returncode}:\n{self.log(host)[-3000:]}"
                        )
                found = {n.name for n in probe.nodes(timeout=0.5)}
                if found >= set(hosts):
                    return
                if time.monotonic() > deadline:
                    missing = sorted(set(hosts) - found)
                    raise RuntimeError(
                        f"nodes {missing} did not answer in {timeout} s:\n{self.log(missing[0])[-3000:]}"
                    )

    def log(self, host):
        path = self.workdir / f"{host}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pool_pids(self, host):
        return child_pids(self.procs[host].pid)

    def kill_node(self, host):
        """SIGKILL the node: its main process and its pool, all at once."""
        proc = self.procs.pop(host)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.dirty.add(host)
        self._write_state()

    def kill_pool_process(self, host, pid):
        """SIGKILL one pool process of ``host`` (as the kernel's OOM killer would)."""
        self._signal_pool_process(host, pid, signal.SIGKILL)

    def freeze_pool_process(self, host, pid):
        """SIGSTOP one pool process of ``host``: its pool is stuck, its node answers."""
        self._signal_pool_process(host, pid, signal.SIGSTOP)

    def _signal_pool_process(self, host, pid, signum):
        assert pid in self.pool_pids(host), (pid, self.pool_pids(host))
        self.dirty.add(host)
        os.kill(pid, signum)

    def cut_link(self, host):
        self.dirty.add(host)
        _run("ip", "link", "set", self.veth[host], "down")

    def restore_link(self, host):
        _run("ip", "link", "set", self.veth[host], "up")

    def slow_down(self, host, fraction):
        """Give the pool processes of ``host`` ``fraction`` of one CPU at most.

        A slow board runs its fits slowly but still answers: the node's main
        process, which answers heartbeats, keeps its CPU. With it inside the
        quota, the kernel's throttling (here 10 ms per 100 ms for the whole
        group, used up by the fits) kept the node silent for 1.6 s at times,
        and the client rightly counted a node that silent as lost.
        """
        quota = _CpuQuota(f"clustersearch-{self.token}-{host}", fraction)
        self.cgroups[host] = quota
        self.dirty.add(host)
        self._write_state()
        pids = self.pool_pids(host)
        assert pids, f"node {host!r} has no pool process to slow down"
        for pid in pids:
            quota.add(pid)
        return pids

    def limit_memory(self, host, nbytes):
        """Give node ``host`` (its main process and its pool) ``nbytes`` of
        memory and no swap (``memory_cgroups=True``)."""
        if host not in self.memory:
            raise RuntimeError(f"node {host!r} has no memory cgroup (memory_cgroups=True)")
        self.memory[host].limit(nbytes)

    def stop_broker(self):
        self.broker_stopped = True
        self.dirty.update(self.procs)
        self._write_state()  # a run killed now still gets the broker back
        _run("rabbitmqctl", "-q", "stop_app")

    def start_broker(self):
        _run("rabbitmqctl", "-q", "start_app")
        _run("rabbitmqctl", "-q", "await_startup")
        self.broker_stopped = False
        self._write_state()

    def reset(self, hosts=None, broker=None):
        """Healthy nodes on ``hosts`` (the first ``n_nodes``) again, after a fault.

        Nodes a fault touched are restarted; the others keep running.
        ``broker`` (``"rabbitmq"`` or ``"redis"``): the broker the nodes use
        from now on (a change restarts every node); None keeps it.
        """
        hosts = hosts or self.hosts[: self.n_nodes]
        if broker is not None and broker != self.broker_kind:
            if broker not in BROKERS:
                raise ValueError(f"broker must be one of {BROKERS}, not {broker!r}")
            self.dirty.update(self.procs)
            self.broker_kind = broker
        if self.broker_stopped:
            self.start_broker()
        for host in self.hosts:
            self.restore_link(host)
        for host in list(self.procs):
            if host in self.dirty or host not in hosts or self.procs[host].poll() is not None:
                self.kill_node(host)
        for host in list(self.cgroups):
            _CpuQuota.remove(self.cgroups.pop(host).path)
        self.dirty.clear()
        for host in hosts:
            if host not in self.procs:
                self.start_node(host, wait=False)
        self.wait_for(hosts)


def _flush_redis_broker():
    """Empty the Redis database the nodes used as their broker."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_BROKER_DB)
    try:
        client.flushdb()
    finally:
        client.close()


def _stop_process(proc):
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _teardown(state, errors):
    for ns in state.get("netns", ()):
        proc = _run("ip", "netns", "pids", ns, check=False)
        for pid in proc.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        if Path("/run/netns", ns).exists():
            proc = _run("ip", "netns", "del", ns, check=False)
            if proc.returncode != 0:
                errors.append(f"ip netns del {ns}: {proc.stderr.strip()}")
    for dev in [*state.get("veth", ()), state.get("bridge")]:
        if dev and Path("/sys/class/net", dev).exists():
            proc = _run("ip", "link", "del", dev, check=False)
            # A veth goes with its peer when the namespace holding the peer
            # is deleted, which may finish after the check above.
            if proc.returncode != 0 and Path("/sys/class/net", dev).exists():
                errors.append(f"ip link del {dev}: {proc.stderr.strip()}")
    if state.get("vhost"):
        _run("rabbitmqctl", "-q", "delete_vhost", state["vhost"], check=False)
    if state.get("user"):
        _run("rabbitmqctl", "-q", "delete_user", state["user"], check=False)


def reap_leftovers():
    """Tear down what a test run killed before its teardown left behind."""
    if not STATE_DIR.exists():
        return
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        run = state.get("run")
        if _same_process(run) if run else _pid_alive(state.get("pid", 0)):
            continue  # its run is still going
        # Only processes whose start time matches: a pid from a dead run may
        # name another process by now. (A state file of the older format has
        # bare pids only; its nodes die with their namespaces in _teardown.)
        if state.get("broker_stopped"):
            _run("rabbitmqctl", "-q", "start_app", check=False)
            _run("rabbitmqctl", "-q", "await_startup", check=False)
        for identity in state.get("nodes", ()):
            _kill_recorded(identity, group=True)
        _kill_recorded(state.get("proxy"))
        for cgroup in state.get("cgroups", ()):
            _CpuQuota.remove(cgroup)
        _teardown(state, [])
        path.unlink(missing_ok=True)
