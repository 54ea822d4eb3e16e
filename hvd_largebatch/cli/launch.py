"""``hvd-largebatch launch``: check, render and start the job templates of ``jobs/launch``.

::

    hvd-largebatch launch {mpirun,horovodrun,elastic,slurm,pbs,mpijob} CONFIG
        [--nodes N] [--gpus-per-node G] [--data PATH] [--data-remote] [--output DIR]
        [--set KEY=VALUE ...] [--synthetic] [--hosts H | --hostfile F]
        [--min-nodes N] [--max-nodes N] [--cpus-per-gpu C] [--job-name NAME]
        [--image IMAGE] [--data-pvc CLAIM] [--output-pvc CLAIM] [--check | --dry-run]
        [--gpu-throughput IMG_PER_S --network GBIT_S[,LATENCY_US] [--intra-node ...] ...]

The shell templates (``mpirun.sh``, ``horovodrun.sh``, ``horovodrun_elastic.sh``,
``slurm.sbatch``, ``pbs.sh``) and the MPIJob manifest (``mpijob.yaml``) are the one place the
launch commands are written; this command never rebuilds them. It

1. checks the job (:func:`check_job`), before anything is queued: the config loads; the world
   size ``nodes x gpus_per_node`` (one rank per GPU) divides the global batch of every schedule
   phase; the per-GPU batch ``global batch / world size`` fits ``train.max_per_rank_batch`` or is
   accumulated over micro-batches (reported per phase); the data path exists here, or is
   declared remote (``--data-remote``: mounted on the compute nodes only, e.g. ``/lustre/...``);
   the host list has ``nodes`` hosts of ``gpus_per_node`` slots; for ``elastic``, every
   reachable world size divides every global batch and the trainer supports Horovod elastic.
   A failure prints one ``error:`` line naming the problem (config key, option or file) and
   exits with status 2;
2. ``--check`` stops there (the templates call it as their first step);
3. ``--dry-run`` prints the submission command and the exact commands the job runs (the
   template run with ``DRY_RUN=1``), or the rendered MPIJob manifest, and starts nothing;
   with ``--gpu-throughput`` (and ``--network``: per node with ``--intra-node``, per GPU
   otherwise) it also prints the job's predicted time to train on its ``nodes x
   gpus_per_node`` ranks (:mod:`hvd_largebatch.cli.prediction`), without it a line saying
   which options give one;
4. otherwise submits: ``bash <template>`` (mpirun, horovodrun, elastic), ``sbatch``, ``qsub``
   or ``kubectl apply -f -``.

Defaults: 32 nodes x 8 GPUs = 256 ranks (Goyal et al.'s 1-hour job); data path and output
folder from the config unless given.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hvd_largebatch.cli import prediction

LAUNCHERS = ("mpirun", "horovodrun", "elastic", "slurm", "pbs", "mpijob")
#: launcher -> template file in jobs/launch
TEMPLATES = {"mpirun": "mpirun.sh", "horovodrun": "horovodrun.sh",
             "elastic": "horovodrun_elastic.sh", "slurm": "slurm.sbatch", "pbs": "pbs.sh",
             "mpijob": "mpijob.yaml"}
#: files of jobs/launch that the MPIJob's ConfigMap carries (key -> path under JOBS_DIR)
MPIJOB_FILES = {"common.sh": "launch/common.sh", "mpirun.sh": "launch/mpirun.sh",
                "preflight.py": "launch/preflight.py"}
MPIJOB_CONFIG_KEY = "job.yaml"
DEFAULT_NODES = 32
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_CPUS_PER_GPU = 8
DEFAULT_JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
_JOB_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?")  # DNS-1123, room for "-files"


@dataclass(frozen=True)
class JobSpec:
    """What to launch. ``nodes x gpus_per_node`` ranks, one per GPU. ``data`` / ``output``
    replace the config's ``data.path`` / ``output.dir`` (None: keep the config's);
    ``overrides`` are further ``key=value`` config overrides for the trainer."""

    launcher: str
    config: str
    nodes: int = DEFAULT_NODES
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    data: str | None = None
    data_remote: bool = False
    output: str | None = None
    overrides: tuple[str, ...] = ()
    synthetic: bool = False
    hosts: str | None = None
    hostfile: str | None = None
    min_nodes: int | None = None
    max_nodes: int | None = None
    cpus_per_gpu: int = DEFAULT_CPUS_PER_GPU
    job_name: str | None = None
    image: str = "hvd-largebatch:latest"
    data_pvc: str = "hvd-largebatch-data"
    output_pvc: str = "hvd-largebatch-output"
    jobs_dir: str = str(DEFAULT_JOBS_DIR)

    @property
    def world_size(self) -> int:
        """Ranks of the job (one per GPU)."""
        return self.nodes * self.gpus_per_node

    @property
    def template(self) -> Path:
        return Path(self.jobs_dir) / "launch" / TEMPLATES[self.launcher]

    @property
    def name(self) -> str:
        """The job's name: ``--job-name``, else ``hvd-`` + the config file's stem."""
        if self.job_name:
            return self.job_name
        stem = re.sub(r"[^a-z0-9]+", "-", Path(self.config).stem.lower()).strip("-")
        return f"hvd-{stem}"[:52].rstrip("-")

    def train_overrides(self) -> list[str]:
        """The ``--set`` overrides the trainer gets: data path, output folder, then the rest."""
        out = [f"data.path={self.data}"] if self.data else []
        if self.output:
            out.append(f"output.dir={self.output}")
        return out + list(self.overrides)


@dataclass
class JobCheck:
    """A checked job: the config and schedule it runs, ``plan`` (``cli.plan.build_plan``: per
    phase global batch, per-rank batch and micro-batches for this world size) and notes worth
    printing (accumulation, remote data, hosts from the allocation)."""

    cfg: object
    schedule: object
    plan: dict
    notes: list[str] = field(default_factory=list)


# -- checks ------------------------------------------------------------------------------------

def check_job(spec: JobSpec) -> JobCheck:
    """Check ``spec`` as the module docstring says; ``ConfigError`` / ``DataError`` naming the
    problem otherwise. Reads the config and looks at the data folder; starts nothing."""
    from hvd_largebatch.cli.plan import build_plan
    from hvd_largebatch.errors import ConfigError
    from hvd_largebatch.training.config import build_schedule, load_config

    if spec.launcher not in LAUNCHERS:
        raise ConfigError("launcher", f"must be one of {', '.join(LAUNCHERS)}, got {spec.launcher!r}")
    for key, value in (("--nodes", spec.nodes), ("--gpus-per-node", spec.gpus_per_node),
                       ("--cpus-per-gpu", spec.cpus_per_gpu)):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if not spec.template.is_file():
        raise ConfigError("--jobs-dir", f"{spec.template} not found (the jobs/ folder of the "
                          f"hvd-largebatch repository; pass --jobs-dir)")
    for item in spec.train_overrides():
        if "=" not in item or re.search(r"\s", item):
            raise ConfigError("--set", f"expected key=value without spaces (the templates pass "
                              f"overrides as a space-separated list), got {item!r}")
    if not _JOB_NAME.fullmatch(spec.name):
        raise ConfigError("--job-name", f"{spec.name!r} must be lowercase letters, digits and "
                          f"'-' (at most 52 characters, starting and ending alphanumeric)")

    cfg = load_config(spec.config, spec.train_overrides())
    schedule = build_schedule(cfg, None)
    check_world_size(schedule, spec.world_size, spec.gpus_per_node)
    plan = build_plan(schedule, spec.world_size, max_per_rank_batch=cfg.train.max_per_rank_batch)
    job = JobCheck(cfg, schedule, plan)
    for k, p in enumerate(plan["phases"]):
        if p["micro_batches"] > 1:
            job.notes.append(
                f"phase {k}: per-GPU batch {p['per_rank_batch']} > train.max_per_rank_batch "
                f"{cfg.train.max_per_rank_batch}: gradients accumulated over "
                f"{p['micro_batches']} micro-batches of {p['micro_batch']}")
    if schedule.workers and schedule.workers != spec.world_size:
        job.notes.append(
            f"the recipe was written for {schedule.workers} ranks (schedule.workers); global "
            f"batches, lr and updates stay the same, per-GPU batches and BN statistics change")
    if spec.synthetic:
        job.notes.append("synthetic rehearsal (train --synthetic): the data is not read")
    elif spec.launcher == "mpijob":
        job.notes.append(f"data: volume claim {spec.data_pvc} mounted at {mpijob_data_path(spec, cfg)}")
    else:
        job.notes += check_data(cfg, spec.data_remote)
    if spec.launcher in ("mpirun", "horovodrun"):
        job.notes += check_hosts(spec)
    if spec.launcher == "elastic":
        check_elastic(spec, cfg, schedule)
    return job


def check_world_size(schedule, world_size: int, gpus_per_node: int) -> None:
    """ConfigError naming the first phase whose global batch does not divide by
    ``world_size``, with the node counts (of ``gpus_per_node`` GPUs) that would."""
    from hvd_largebatch.errors import ConfigError

    try:
        schedule.validate(world_size)
    except ConfigError as e:
        common = math.gcd(*(p.global_batch for p in schedule.phases))
        fits = [n for n in range(1, common // gpus_per_node + 1) if common % (n * gpus_per_node) == 0]
        hint = (f"; node counts whose {gpus_per_node} GPUs each divide every global batch: "
                f"{', '.join(map(str, fits))}" if fits else
                f"; no node count of {gpus_per_node} GPUs divides every global batch")
        raise ConfigError(e.key, str(e)[len(e.key) + 2:] + hint) from None


def check_data(cfg, remote: bool) -> list[str]:
    """Check ``data.path`` of a folder or filelist config; returns notes. A URL is refused
    (the trainer reads files); a remote path (mounted on the compute nodes only) is not
    looked at. DataError naming the missing folder or file otherwise."""
    from hvd_largebatch.errors import ConfigError, DataError

    d = cfg.data
    if d.source not in ("folder", "filelist"):
        return []
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", d.path):
        raise ConfigError("data.path", f"{d.path} is a URL, but the trainer reads files: mount "
                          f"the storage on the compute nodes and give the mount point "
                          f"(with --data-remote if it is not mounted here)")
    if remote:
        return [f"data: {d.path} declared remote (on the compute nodes): not checked here"]
    hint = " (pass --data-remote, or DATA_REMOTE=1, if it exists on the compute nodes only)"
    if not os.path.isdir(d.path):
        raise DataError(f"{d.path}: data.path does not exist or is not a folder{hint}")
    if d.source == "folder":
        needed = [os.path.join(d.path, "train"), os.path.join(d.path, "val")]
        kind = "data.source folder reads <path>/train/<class>/<image> and <path>/val/<class>/<image>"
        is_there = os.path.isdir
    else:
        needed = [os.path.join(d.path, d.train_list), os.path.join(d.path, d.val_list)]
        kind = "data.source filelist reads data.train_list and data.val_list under data.path"
        is_there = os.path.isfile
    for path in needed:
        if not is_there(path):
            raise DataError(f"{path}: missing; {kind}")
    return [f"data: {d.path} found"]


def parse_hosts(spec: JobSpec) -> dict[str, int] | None:
    """Host -> slots from ``--hosts`` (``h1:8,h2:8``; a host without ``:slots`` has 1) or
    ``--hostfile`` (``host slots=8`` lines, or a host repeated once per slot as in
    ``$PBS_NODEFILE``; ``#`` comments); None when neither is given."""
    from hvd_largebatch.errors import ConfigError

    slots: dict[str, int] = {}
    if spec.hosts:
        for item in spec.hosts.split(","):
            host, _, count = item.strip().partition(":")
            if not host or (count and not count.isdigit()):
                raise ConfigError("--hosts", f"expected host:slots items, got {item!r}")
            slots[host] = slots.get(host, 0) + (int(count) if count else 1)
        return slots
    if spec.hostfile:
        try:
            lines = Path(spec.hostfile).read_text().splitlines()
        except OSError as e:
            raise ConfigError("--hostfile", f"cannot read {spec.hostfile} ({e.strerror or e})") from e
        for number, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            count = 1
            for word in words[1:]:
                key, _, value = word.partition("=")
                if key == "slots":
                    if not value.isdigit():
                        raise ConfigError("--hostfile", f"{spec.hostfile}:{number}: bad {word!r}")
                    count = int(value)
            slots[words[0]] = slots.get(words[0], 0) + count
        return slots
    return None


def check_hosts(spec: JobSpec) -> list[str]:
    """The host list must name ``nodes`` hosts with ``gpus_per_node`` slots each (ranks are
    placed slot by slot, so a host with more slots would get ranks without a GPU). Without a
    list: one node runs on localhost; mpirun on several nodes takes the hosts of its
    allocation; horovodrun cannot."""
    from hvd_largebatch.errors import ConfigError

    slots = parse_hosts(spec)
    key = "--hostfile" if spec.hostfile else "--hosts"
    if slots is None:
        if spec.nodes == 1:
            return [f"hosts: localhost:{spec.gpus_per_node}"]
        if spec.launcher == "horovodrun":
            raise ConfigError("--hosts", f"horovodrun needs --hosts or --hostfile for "
                              f"{spec.nodes} nodes (it has no SLURM or PBS integration; "
                              f"use the slurm or pbs launcher there)")
        return ["hosts: none given; mpirun takes the hosts of the allocation it runs in "
                "(SLURM, PBS, LSF, or OMPI_MCA_orte_default_hostfile)"]
    if len(slots) != spec.nodes:
        raise ConfigError(key, f"lists {len(slots)} hosts, the job asks for --nodes {spec.nodes}")
    for host, count in slots.items():
        if count != spec.gpus_per_node:
            raise ConfigError(key, f"host {host} has {count} slots, the job runs "
                              f"--gpus-per-node {spec.gpus_per_node} ranks per node")
    return [f"hosts: {', '.join(slots)}"]


def check_elastic(spec: JobSpec, cfg, schedule) -> None:
    """Every world size an elastic job can reach (``min_nodes`` .. ``max_nodes`` nodes of
    ``gpus_per_node`` ranks) must divide every global batch, and the config must run elastic
    (replicated optimizer state: see :mod:`hvd_largebatch.training.elastic`)."""
    from hvd_largebatch.errors import ConfigError

    low = spec.min_nodes if spec.min_nodes is not None else spec.nodes
    high = spec.max_nodes if spec.max_nodes is not None else spec.nodes
    if not 1 <= low <= spec.nodes <= high:
        raise ConfigError("--min-nodes", f"need 1 <= --min-nodes ({low}) <= --nodes "
                          f"({spec.nodes}) <= --max-nodes ({high})")
    batches = sorted({p.global_batch for p in schedule.phases})
    bad = [n * spec.gpus_per_node for n in range(low, high + 1)
           if any(b % (n * spec.gpus_per_node) for b in batches)]
    if bad:
        raise ConfigError("--min-nodes", f"the job may shrink or grow to world sizes "
                          f"{', '.join(map(str, bad))}, which do not divide every global batch "
                          f"({', '.join(map(str, batches))}); narrow --min-nodes/--max-nodes")
    from hvd_largebatch.training.elastic import check_elastic as check_trainer_elastic

    # the config half of the trainer's own check; the job itself sets HOROVOD_ELASTIC
    check_trainer_elastic(cfg, environ={"HOROVOD_ELASTIC": "1"})


# -- rendering ---------------------------------------------------------------------------------

def template_env(spec: JobSpec) -> dict[str, str]:
    """The environment variables a shell template reads (see jobs/launch/common.sh)."""
    env = {"JOBS_DIR": spec.jobs_dir, "CONFIG": spec.config, "NODES": str(spec.nodes),
           "GPUS_PER_NODE": str(spec.gpus_per_node),
           "PYTHON": os.environ.get("PYTHON", sys.executable)}
    if spec.data:
        env["DATA"] = spec.data
    if spec.data_remote and spec.launcher not in ("slurm", "pbs"):
        # slurm / pbs jobs check again on their first node, where the data must be visible
        env["DATA_REMOTE"] = "1"
    if spec.output:
        env["OUTPUT"] = spec.output
    if spec.overrides:
        env["TRAIN_SET"] = " ".join(spec.overrides)
    if spec.synthetic:
        env["SYNTHETIC"] = "1"
    if spec.hostfile:
        env["HOSTFILE"] = spec.hostfile
    elif spec.hosts:
        env["HOSTS"] = spec.hosts
    if spec.launcher == "elastic":
        env["MIN_NODES"] = str(spec.min_nodes or spec.nodes)
        env["MAX_NODES"] = str(spec.max_nodes or spec.nodes)
    env.update(launchers_beside(env["PYTHON"]))
    return env


def launchers_beside(python: str) -> dict[str, str]:
    """``HOROVODRUN`` / ``MPIRUN`` for the templates: the launchers in the folder of ``python``
    (the Python that runs this package, e.g. a venv's bin, which need not be on PATH), where
    they exist there; the templates fall back to PATH for the others."""
    folder = os.path.dirname(python)
    found = {}
    for var, name in (("HOROVODRUN", "horovodrun"), ("MPIRUN", "mpirun")):
        path = os.path.join(folder, name)
        if folder and os.access(path, os.X_OK):
            found[var] = path
    return found


def submit_command(spec: JobSpec) -> list[str]:
    """How the job is started: the template under bash, sbatch, qsub, or kubectl."""
    n, g, template = spec.nodes, spec.gpus_per_node, str(spec.template)
    if spec.launcher == "slurm":
        return ["sbatch", f"--job-name={spec.name}", f"--nodes={n}", f"--ntasks-per-node={g}",
                "--gpus-per-task=1", f"--cpus-per-task={spec.cpus_per_gpu}", template]
    if spec.launcher == "pbs":
        return ["qsub", "-V", "-N", spec.name, "-l",
                f"select={n}:ncpus={g * spec.cpus_per_gpu}:ngpus={g}:mpiprocs={g}", template]
    if spec.launcher == "mpijob":
        return ["kubectl", "apply", "-f", "-"]
    return ["bash", template]


def job_commands(spec: JobSpec) -> str:
    """The exact commands the job runs: the template's output under ``DRY_RUN=1``."""
    from hvd_largebatch.errors import ConfigError

    env = {**os.environ, **template_env(spec), "DRY_RUN": "1", "CHECKED": "1"}
    proc = subprocess.run(["bash", str(spec.template)], env=env, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode:
        raise ConfigError(f"launch {spec.launcher}", f"{spec.template} failed under DRY_RUN=1: "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def mpijob_data_path(spec: JobSpec, cfg) -> str:
    """Where the MPIJob mounts the data volume: the data path, which must be absolute."""
    from hvd_largebatch.errors import ConfigError

    path = spec.data or cfg.data.path
    if not path or not path.startswith("/"):
        raise ConfigError("--data", f"an MPIJob mounts the data volume at the data path, which "
                          f"must be absolute; got {path!r}")
    return path


def mpijob_output_path(spec: JobSpec, cfg) -> str:
    """Where the MPIJob mounts the output volume: the output folder (relative ones go under
    /workspace)."""
    path = spec.output or cfg.output.dir
    return path if path.startswith("/") else f"/workspace/{path}"


def render_mpijob(spec: JobSpec, job: JobCheck) -> str:
    """The MPIJob and ConfigMap manifests for ``spec`` (YAML documents)."""
    import yaml

    values = {"JOB_NAME": spec.name, "IMAGE": spec.image, "NODES": spec.nodes,
              "GPUS_PER_NODE": spec.gpus_per_node, "DATA": mpijob_data_path(spec, job.cfg),
              "OUTPUT": mpijob_output_path(spec, job.cfg), "TRAIN_SET": " ".join(spec.overrides),
              "SYNTHETIC": "1" if spec.synthetic else "0", "DATA_PVC": spec.data_pvc,
              "OUTPUT_PVC": spec.output_pvc}
    docs = [_fill(doc, values) for doc in yaml.safe_load_all(spec.template.read_text())]
    for doc in docs:
        if doc["kind"] == "MPIJob":
            for replica in doc["spec"]["mpiReplicaSpecs"].values():
                for container in replica["template"]["spec"]["containers"]:
                    for var in container.get("env", []):  # Kubernetes wants strings here
                        var["value"] = str(var["value"])
        elif doc["kind"] == "ConfigMap":
            files = {key: (Path(spec.jobs_dir) / path).read_text()
                     for key, path in MPIJOB_FILES.items()}
            doc["data"] = {MPIJOB_CONFIG_KEY: Path(spec.config).read_text(), **files}
    header = (f"# rendered by `hvd-largebatch launch mpijob` from {spec.template}\n"
              f"# config: {spec.config}; {spec.nodes} pods x {spec.gpus_per_node} GPUs = "
              f"{spec.world_size} ranks\n")
    return header + yaml.dump_all(docs, Dumper=_block_dumper(), sort_keys=False, width=100)


def _fill(node, values: dict):
    """``node`` with ``${NAME}`` placeholders replaced: a scalar that is one placeholder takes
    the value itself (ints stay ints), others are substituted as text."""
    from string import Template

    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", node)
        return values[whole.group(1)] if whole else Template(node).substitute(values)
    return node


def _block_dumper():
    """A safe YAML dumper that writes multi-line strings (the ConfigMap's files) as literal
    blocks."""
    import yaml

    class BlockDumper(yaml.SafeDumper):
        pass

    def block_string(dumper, text: str):
        style = "|" if "\n" in text else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)

    BlockDumper.add_representer(str, block_string)
    return BlockDumper


# -- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("launcher", choices=LAUNCHERS,
                        help="mpirun, horovodrun, elastic (horovodrun --min-np/--max-np), "
                             "slurm (sbatch + srun), pbs (qsub + mpirun), mpijob (Kubeflow)")
    parser.add_argument("config", help="YAML config of the run, e.g. jobs/configs/goyal_1h_resnet50.yaml")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, metavar="N",
                        help=f"nodes (default {DEFAULT_NODES})")
    parser.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE, metavar="G",
                        help=f"GPUs = ranks per node (default {DEFAULT_GPUS_PER_NODE})")
    parser.add_argument("--data", metavar="PATH", help="data.path on the compute nodes "
                        "(default: the config's)")
    parser.add_argument("--data-remote", action="store_true",
                        help="the data path is mounted on the compute nodes only: do not look for it here")
    parser.add_argument("--output", metavar="DIR", help="output.dir (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="more config overrides for the trainer (no spaces)")
    parser.add_argument("--synthetic", action="store_true",
                        help="rehearse the job on random data at tiny scale (train --synthetic)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", metavar="H1:G,H2:G", help="mpirun / horovodrun hosts")
    hosts.add_argument("--hostfile", metavar="FILE", help="mpirun / horovodrun hostfile "
                       "(`host slots=G` lines)")
    parser.add_argument("--min-nodes", type=int, metavar="N", help="elastic: fewest nodes (default --nodes)")
    parser.add_argument("--max-nodes", type=int, metavar="N", help="elastic: most nodes (default --nodes)")
    parser.add_argument("--cpus-per-gpu", type=int, default=DEFAULT_CPUS_PER_GPU, metavar="C",
                        help=f"slurm / pbs: CPU cores per rank (default {DEFAULT_CPUS_PER_GPU})")
    parser.add_argument("--job-name", metavar="NAME", help="default: hvd-<config name>")
    parser.add_argument("--image", default=JobSpec.image, help="mpijob: container image")
    parser.add_argument("--data-pvc", default=JobSpec.data_pvc, metavar="CLAIM",
                        help="mpijob: volume claim holding the data")
    parser.add_argument("--output-pvc", default=JobSpec.output_pvc, metavar="CLAIM",
                        help="mpijob: volume claim for the outputs")
    parser.add_argument("--jobs-dir", default=os.environ.get("HVD_LARGEBATCH_JOBS", str(DEFAULT_JOBS_DIR)),
                        help="the jobs/ folder with the templates (default: $HVD_LARGEBATCH_JOBS, "
                             "else the repository's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="check the job only")
    mode.add_argument("--dry-run", action="store_true",
                      help="check, then print the commands (or the manifest) and the predicted "
                           "time to train; start nothing")
    prediction.add_arguments(parser, gpus_per_node=False)


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    return JobSpec(
        launcher=args.launcher, config=os.path.abspath(args.config), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, data=args.data, data_remote=args.data_remote,
        output=args.output, overrides=tuple(args.overrides), synthetic=args.synthetic,
        hosts=args.hosts, hostfile=args.hostfile, min_nodes=args.min_nodes,
        max_nodes=args.max_nodes, cpus_per_gpu=args.cpus_per_gpu, job_name=args.job_name,
        image=args.image, data_pvc=args.data_pvc, output_pvc=args.output_pvc,
        jobs_dir=os.path.abspath(args.jobs_dir))


def describe(spec: JobSpec, job: JobCheck) -> str:
    """The check's findings as ``#`` comment lines: ranks, the per-phase plan, notes."""
    from hvd_largebatch.cli.plan import format_table

    head = (f"{spec.launcher}: {spec.config}: {spec.nodes} nodes x {spec.gpus_per_node} GPUs = "
            f"{spec.world_size} ranks")
    lines = [head, *format_table(job.plan).splitlines(), *job.notes, "check passed"]
    return comment("\n".join(lines))


def comment(text: str) -> str:
    """``text`` as ``#`` comment lines."""
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines())


def predicted_time(args: argparse.Namespace, spec: JobSpec, job: JobCheck) -> str:
    """The job's predicted time to train (``#`` lines), or how to get one."""
    system = prediction.system_from_args(args, spec.world_size, spec.gpus_per_node)
    if system is None:
        return comment("predicted time to train: give --gpu-throughput IMG_PER_S and --network "
                       "GBIT_S[,LATENCY_US] (see hvd-largebatch launch --help)")
    cfg = job.cfg
    parameters = args.parameters or prediction.model_parameters(
        cfg.model.name, cfg.model.options, cfg.model.num_classes or cfg.data.num_classes)
    result = prediction.predict(job.plan, system, parameters, cfg.optimizer.name,
                                cfg.optimizer.shard_optimizer_state)
    return comment(prediction.format_prediction(result).lstrip("\n"))


def run(args: argparse.Namespace) -> int:
    from hvd_largebatch.errors import ConfigError, DataError

    try:
        spec = spec_from_args(args)
        job = check_job(spec)
        print(describe(spec, job), flush=True)
        if args.check:
            return 0
        if args.dry_run:
            print(predicted_time(args, spec, job), flush=True)
        if spec.launcher == "mpijob":
            manifest = render_mpijob(spec, job)
        elif args.dry_run:
            commands = job_commands(spec)
    except (ConfigError, DataError) as e:
        print(f"hvd-largebatch launch: error: {e}", file=sys.stderr)
        return 2
    submit = submit_command(spec)
    env = template_env(spec)
    if args.dry_run:
        if spec.launcher == "mpijob":
            print(f"# submit with: {shlex.join(submit)}\n{manifest}", end="")
        else:
            assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"# submit with:\n{assignments} {shlex.join(submit)}\n# the job runs:\n"
                  f"{commands}", end="")
        return 0
    try:
        if spec.launcher == "mpijob":
            return subprocess.run(submit, input=manifest, text=True).returncode
        # mpirun / horovodrun / elastic run here and were just checked; slurm / pbs jobs check
        # again on their first node, where the data path is visible
        extra = {"CHECKED": "1"} if spec.launcher in ("mpirun", "horovodrun", "elastic") else {}
        return subprocess.call(submit, env={**os.environ, **env, **extra})
    except FileNotFoundError:
        print(f"hvd-largebatch launch: error: {submit[0]} not found: submit from a machine of "
              f"the cluster, or print the commands with --dry-run", file=sys.stderr)
        return 2
