"""jobs/: the paper configs, the launch templates and ``hvd-largebatch launch``.

References are the papers' recipes and numbers as written in /work/shared/reference/papers.md
(phases, batches, lr, momentum, update counts computed here as epochs x N / B), Horovod's
documented mpirun flags, and the Kubeflow MPIJob v2beta1 schema.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from hvd_largebatch.cli.launch import JobSpec, check_job
from hvd_largebatch.cli.main import main as cli_main
from hvd_largebatch.errors import ConfigError, DataError
from hvd_largebatch.models import build_model
from hvd_largebatch.training.config import build_schedule, load_config
from hvd_largebatch.training.setup import rehearsal_schedule
from launch import REPO, ROOT_ENV, run_ranks

JOBS = REPO / "jobs"
LAUNCH = JOBS / "launch"
CONFIGS = JOBS / "configs"
IMAGENET_N = 1_281_167
CIFAR10_N = 50_000
SHELL_TEMPLATES = ["common.sh", "mpirun.sh", "horovodrun.sh", "horovodrun_elastic.sh",
                   "discover_hosts.sh", "slurm.sbatch", "pbs.sh"]
# Horovod's documented mpirun convention
HOROVOD_MPIRUN_FLAGS = ["-bind-to none", "-map-by slot", "-x NCCL_DEBUG=INFO",
                        "-x LD_LIBRARY_PATH", "-x PATH", "-mca pml ob1", "-mca btl ^openib"]


@dataclass
class Paper:
    """A paper's recipe: phases (start epoch, end epoch, global batch, lr at start, lr at end,
    momentum), the ranks it assumes, N, Nesterov, and the update count papers.md derives."""

    phases: list[tuple]
    workers: int
    n: int
    nesterov: bool
    updates: int
    arxiv: str
    reconstructed: bool


def _wrn(phases, updates):
    return Paper(phases, 8, CIFAR10_N, False, updates, "1711.00489", True)


PAPERS = {
    "goyal_1h_resnet50": Paper(
        [(0, 5, 8192, 0.1, 3.2, 0.9), (5, 30, 8192, 3.2, 3.2, 0.9), (30, 60, 8192, 0.32, 0.32, 0.9),
         (60, 80, 8192, 0.032, 0.032, 0.9), (80, 90, 8192, 0.0032, 0.0032, 0.9)],
        256, IMAGENET_N, True, 14_075, "1706.02677", False),
    # batch x2 with lr / 5 at epoch 30, then lr / 10 at 60 and 80 (papers.md reconstruction)
    "smith_30min_resnet50": Paper(
        [(0, 5, 8192, 0.1, 3.2, 0.9), (5, 30, 8192, 3.2, 3.2, 0.9), (30, 60, 16384, 0.64, 0.64, 0.9),
         (60, 80, 16384, 0.064, 0.064, 0.9), (80, 90, 16384, 0.0064, 0.0064, 0.9)],
        256, IMAGENET_N, True, 9_384, "1711.00489", True),
    "lars_32k_resnet50": Paper(
        [(0, 12, 32768, 0.0, 40.0, 0.9), (12, 100, 32768, 40.0, 0.0, 0.9)],
        256, IMAGENET_N, False, 3_910, "1708.03888", True),
    "smith_wrn_cifar10_original": _wrn(
        [(0, 60, 128, 0.1, 0.1, 0.9), (60, 120, 128, 0.02, 0.02, 0.9),
         (120, 160, 128, 0.004, 0.004, 0.9), (160, 200, 128, 0.0008, 0.0008, 0.9)], 78_125),
    "smith_wrn_cifar10_increasing_batch": _wrn(
        [(0, 60, 128, 0.1, 0.1, 0.9), (60, 120, 640, 0.1, 0.1, 0.9),
         (120, 160, 3200, 0.1, 0.1, 0.9), (160, 200, 5120, 0.032, 0.032, 0.9)], 29_141),
    "smith_wrn_cifar10_increased_lr": _wrn(
        [(0, 60, 640, 0.5, 0.5, 0.9), (60, 120, 3200, 0.5, 0.5, 0.9),
         (120, 160, 5120, 0.16, 0.16, 0.9), (160, 200, 5120, 0.032, 0.032, 0.9)], 6_406),
    "smith_wrn_cifar10_increased_momentum": _wrn(
        [(0, 60, 3200, 0.5, 0.5, 0.98), (60, 120, 5120, 0.16, 0.16, 0.98),
         (120, 160, 5120, 0.032, 0.032, 0.98), (160, 200, 5120, 0.0064, 0.0064, 0.98)], 2_305),
}
GOYAL = str(CONFIGS / "goyal_1h_resnet50.yaml")


def config_path(stem: str) -> str:
    return str(CONFIGS / f"{stem}.yaml")


def paper_updates(paper: Paper) -> float:
    return sum((end - start) * paper.n / batch for start, end, batch, *_ in paper.phases)


# -- the configs ---------------------------------------------------------------------------------

def test_every_config_is_a_paper_config():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(PAPERS)


@pytest.mark.parametrize("stem", sorted(PAPERS))
def test_config_resolves_to_the_papers_schedule(stem):
    paper = PAPERS[stem]
    cfg = load_config(config_path(stem))
    schedule = build_schedule(cfg, None)
    assert schedule.dataset_size == paper.n
    assert schedule.workers == paper.workers
    assert schedule.nesterov is paper.nesterov
    got = [(p.start_epoch, p.end_epoch, p.global_batch, p.lr_start, p.lr_end, p.momentum)
           for p in schedule.phases]
    assert len(got) == len(paper.phases)
    for phase, expected in zip(got, paper.phases):
        assert phase == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert schedule.nominal_updates == pytest.approx(paper_updates(paper), rel=1e-12)
    assert round(schedule.nominal_updates) == paper.updates
    # it states where it comes from, and says so when a detail is a reconstruction
    assert paper.arxiv in schedule.source
    assert ("reconstruct" in schedule.source.lower()) is paper.reconstructed
    text = Path(config_path(stem)).read_text()
    assert paper.arxiv in text and ("RECONSTRUCTION" in text) is paper.reconstructed


@pytest.mark.parametrize("stem", sorted(PAPERS))
def test_plan_command_prints_the_papers_numbers(stem, capsys):
    paper = PAPERS[stem]
    assert cli_main(["plan", config_path(stem), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == paper.workers  # the recipe's rank count is the default
    assert round(plan["nominal_updates"]) == paper.updates
    assert [p["global_batch"] for p in plan["phases"]] == [b for _, _, b, *_ in paper.phases]
    assert [p["per_rank_batch"] for p in plan["phases"]] == [b // paper.workers
                                                             for _, _, b, *_ in paper.phases]


def test_goyal_config_is_the_1_hour_recipe():
    cfg = load_config(GOYAL)
    # 32 images per GPU on 256 GPUs, lr 3.2 after the 5-epoch warmup, x0.1 at 30/60/80
    schedule = build_schedule(cfg, None)
    assert schedule.phases[0].global_batch // 256 == 32
    assert schedule.at(5, 0).lr == pytest.approx(3.2)
    assert schedule.at(0, 0).lr == pytest.approx(0.1)
    lrs = {e: schedule.at(e, 0).lr for e in (29, 30, 59, 60, 79, 80)}
    assert lrs[30] == pytest.approx(lrs[29] / 10) and lrs[60] == pytest.approx(lrs[59] / 10)
    assert lrs[80] == pytest.approx(lrs[79] / 10)
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay) == ("sgd", 1e-4)
    assert cfg.optimizer.exclude_bn_and_bias  # no weight decay on BN gamma / beta
    assert cfg.train.max_per_rank_batch == 32  # BN statistics over 32 images per GPU
    assert (cfg.data.image_size, cfg.schedule["epochs"]) == (224, 90)


def test_lars_config_uses_lars_with_the_papers_trust_coefficient():
    cfg = load_config(config_path("lars_32k_resnet50"))
    assert (cfg.optimizer.name, cfg.optimizer.trust_coefficient) == ("lars", 0.001)
    assert cfg.optimizer.exclude_bn_and_bias


def _bn_gammas_all_zero(model) -> int:
    return sum(1 for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.any())


@pytest.mark.parametrize("stems,classes,parameters,zero_gammas", [
    # ResNet-50: 25,557,032 parameters with 1000 classes; gamma = 0 on the last BN of its 16 blocks
    (["goyal_1h_resnet50", "smith_30min_resnet50", "lars_32k_resnet50"], 1000, 25_557_032, 16),
    # WRN-16-4 (2.7 M parameters, pre-activation blocks: no zero-gamma)
    (["smith_wrn_cifar10_original", "smith_wrn_cifar10_increasing_batch",
      "smith_wrn_cifar10_increased_lr", "smith_wrn_cifar10_increased_momentum"], 10, 2_748_890, 0),
])
def test_configs_build_the_papers_networks(stems, classes, parameters, zero_gammas):
    models = {(c.model.name, repr(sorted(c.model.options.items())))
              for c in (load_config(config_path(s)) for s in stems)}
    assert len(models) == 1  # the configs of one paper share their network
    cfg = load_config(config_path(stems[0]))
    model = build_model(cfg.model.name, classes, cfg.model.options)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert _bn_gammas_all_zero(model) == zero_gammas


# -- shell templates -----------------------------------------------------------------------------

def test_shell_templates_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required by this test (apt-get install shellcheck)"
    files = [str(LAUNCH / name) for name in SHELL_TEMPLATES]
    proc = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dry_run(template: str, **env: str) -> list[list[str]]:
    """The commands a template prints under DRY_RUN=1 (check skipped), each split into argv."""
    proc = subprocess.run(["bash", str(LAUNCH / template)], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "CHECKED": "1", **env}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def assert_horovod_mpirun(argv: list[str], np: int) -> None:
    text = " ".join(argv)
    assert argv[:3] == ["mpirun", "-np", str(np)]
    for flag in HOROVOD_MPIRUN_FLAGS:
        assert f" {flag} " in f" {text} ", flag


def assert_train(argv: list[str], config: str = GOYAL, sets: tuple[str, ...] = ()) -> None:
    i = argv.index("hvd_largebatch.cli")
    assert argv[i - 1:i + 3] == ["-m", "hvd_largebatch.cli", "train", config]
    rest = argv[i + 3:]
    assert rest[:2 * len(sets)] == [x for s in sets for x in ("--set", s)]
    assert rest[2 * len(sets):] == ["--resume", "auto"]


def test_mpirun_template_defaults_to_256_gpus_with_horovods_flags():
    preflight, train = dry_run("mpirun.sh")
    assert preflight[:2] == ["timeout", "120"]
    assert_horovod_mpirun(preflight[2:], 256)
    assert preflight[-1] == str(LAUNCH / "preflight.py")
    assert_horovod_mpirun(train, 256)
    assert "-H" not in train and "-hostfile" not in train  # hosts of the allocation
    assert_train(train)


def test_templates_are_parameterized_by_nodes_gpus_data_and_output():
    env = dict(NODES="4", GPUS_PER_NODE="4", DATA="/lustre/imagenet", OUTPUT="/scratch/run1",
               HOSTS="a:4,b:4,c:4,d:4", TRAIN_SET="train.seed=3 train.precision=bf16",
               CONFIG=config_path("smith_30min_resnet50"))
    sets = ("data.path=/lustre/imagenet", "output.dir=/scratch/run1", "train.seed=3",
            "train.precision=bf16")
    _, train = dry_run("mpirun.sh", **env)
    assert_horovod_mpirun(train, 16)
    assert train[train.index("-H") + 1] == "a:4,b:4,c:4,d:4"
    assert_train(train, config_path("smith_30min_resnet50"), sets)
    _, train = dry_run("horovodrun.sh", **env)
    assert train[:5] == ["horovodrun", "-np", "16", "-H", "a:4,b:4,c:4,d:4"]
    assert_train(train, config_path("smith_30min_resnet50"), sets)
    _, train = dry_run("slurm.sbatch", **env)
    assert "--ntasks=16" in train and "--ntasks-per-node=4" in train and "--nodes=4" in train
    assert_train(train, config_path("smith_30min_resnet50"), sets)
    (train,) = dry_run("horovodrun_elastic.sh", PREFLIGHT="0", **env)
    assert train[:3] == ["horovodrun", "-np", "16"]
    (train,) = dry_run("mpirun.sh", PREFLIGHT="0", SYNTHETIC="1")
    assert train[-3:] == ["--resume", "auto", "--synthetic"]


def test_horovodrun_template_on_one_node_uses_localhost():
    preflight, train = dry_run("horovodrun.sh", NODES="1")
    assert preflight[2:7] == ["horovodrun", "-np", "8", "-H", "localhost:8"]
    assert train[:5] == ["horovodrun", "-np", "8", "-H", "localhost:8"]
    assert_train(train)


def test_elastic_template_uses_min_max_np_and_host_discovery():
    (train,) = dry_run("horovodrun_elastic.sh", MIN_NODES="16", MAX_NODES="32")
    flags = dict(zip(train[3:12:2], train[4:13:2]))
    assert train[:3] == ["horovodrun", "-np", "256"]
    assert flags == {"--min-np": "128", "--max-np": "256", "--slots-per-host": "8",
                     "--host-discovery-script": str(LAUNCH / "discover_hosts.sh"),
                     "--elastic-timeout": "600"}
    assert train[-1] == "--elastic"  # the trainer's elastic mode (see check_elastic)


def sbatch_directives(path: Path, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in path.read_text().splitlines()
            if line.startswith(prefix)]


def test_slurm_template_runs_8_tasks_per_node_one_gpu_each_and_a_preflight_first():
    directives = sbatch_directives(LAUNCH / "slurm.sbatch", "#SBATCH")
    for wanted in ("--nodes=32", "--ntasks-per-node=8", "--gpus-per-task=1"):
        assert wanted in directives
    preflight, train = dry_run("slurm.sbatch")
    srun = ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--gpu-bind=none", "--nodes=32",
            "--ntasks=256", "--ntasks-per-node=8"]
    assert preflight[:2] == ["timeout", "120"] and preflight[2:9] == srun
    assert preflight[9:] == ["python3", str(LAUNCH / "preflight.py")]
    assert train[:7] == srun
    assert_train(train)
    # outside an allocation and without DRY_RUN it refuses to start
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


def test_pbs_template_runs_mpirun_over_the_node_file(tmp_path):
    assert "select=32:ncpus=64:ngpus=8:mpiprocs=8" in " ".join(
        sbatch_directives(LAUNCH / "pbs.sh", "#PBS"))
    _, train = dry_run("pbs.sh")
    assert_horovod_mpirun(train, 256)
    nodefile = tmp_path / "nodefile"  # PBS lists every host once per mpiprocs slot
    nodefile.write_text("".join(f"n{i}\n" for i in range(3) for _ in range(8)))
    _, train = dry_run("pbs.sh", PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(REPO))
    assert_horovod_mpirun(train, 24)
    assert train[train.index("-hostfile") + 1] == str(nodefile)


def test_template_check_refuses_a_world_size_that_does_not_divide_the_batch():
    # 3 nodes x 8 GPUs = 24 ranks: 8192 is not divisible by 24; the check names the phase
    env = {**os.environ, "DRY_RUN": "1", "NODES": "3", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(LAUNCH / "mpirun.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert "schedule.phases[0].global_batch" in proc.stderr and "24" in proc.stderr
    assert "did not pass its check" in proc.stderr
    assert "mpirun" not in proc.stdout  # nothing printed to run


def test_template_check_passes_and_prints_the_plan_before_the_commands(tmp_path):
    data = tmp_path / "cifar10"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    env = {**os.environ, "DRY_RUN": "1", "NODES": "1", "DATA": str(data),
           "CONFIG": config_path("smith_wrn_cifar10_increasing_batch"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(LAUNCH / "horovodrun.sh")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    comments = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert any("29,141" in line for line in comments)  # the plan's papers' update count
    # 5120 / 8 = 640 per GPU, over train.max_per_rank_batch 128: accumulated as 5 x 128
    assert any("5 micro-batches of 128" in line for line in comments)
    assert comments[-1] == "# check passed" and len(commands) == 2


def test_discover_hosts_prints_host_slots(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# current hosts\nnode1\nnode2:4  # drained to 4\n\n  node3 \n")
    env = {**os.environ, "ELASTIC_HOSTS_FILE": str(hosts), "GPUS_PER_NODE": "8"}
    out = subprocess.run(["bash", str(LAUNCH / "discover_hosts.sh")], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert out.splitlines() == ["node1:8", "node2:4", "node3:8"]
    env = {k: v for k, v in os.environ.items() if k not in ("ELASTIC_HOSTS_FILE", "SLURM_JOB_NODELIST")}
    proc = subprocess.run(["bash", str(LAUNCH / "discover_hosts.sh")], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 1 and "ELASTIC_HOSTS_FILE" in proc.stderr


def test_preflight_fails_fast_without_a_gpu_for_the_rank():
    env = {**os.environ, "PREFLIGHT_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(LAUNCH / "preflight.py")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert "local rank 0 has no GPU (0 visible" in proc.stderr


# -- hvd-largebatch launch ----------------------------------------------------------------------

def launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["launch", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("launcher,template", [
    ("mpirun", "mpirun.sh"), ("horovodrun", "horovodrun.sh"), ("slurm", "slurm.sbatch"),
    ("pbs", "pbs.sh")])
def test_launch_dry_run_prints_the_submission_and_the_exact_commands(capsys, launcher, template):
    args = [launcher, GOYAL, "--data", "/lustre/imagenet", "--data-remote", "--dry-run"]
    if launcher == "horovodrun":
        args += ["--hosts", ",".join(f"n{i}:8" for i in range(32))]
    rc, out, err = launch(capsys, *args)
    assert rc == 0, err
    lines = out.splitlines()
    submit = shlex.split(lines[lines.index("# submit with:") + 1])
    commands = [shlex.split(x) for x in lines[lines.index("# the job runs:") + 1:]]
    assert submit[-1] == str(LAUNCH / template)
    assert "NODES=32" in submit and "GPUS_PER_NODE=8" in submit and f"CONFIG={GOYAL}" in submit
    assert len(commands) == 2 and commands[0][:2] == ["timeout", "120"]
    assert_train(commands[1], GOYAL, ("data.path=/lustre/imagenet",))
    assert "# check passed" in lines
    if launcher == "slurm":
        assert submit[submit.index("sbatch"):-1] == [
            "sbatch", "--job-name=hvd-goyal-1h-resnet50", "--nodes=32", "--ntasks-per-node=8",
            "--gpus-per-task=1", "--cpus-per-task=8"]
        assert "DATA_REMOTE=1" not in submit  # the job checks the data again on its first node
    if launcher == "pbs":
        assert submit[submit.index("qsub"):-1] == [
            "qsub", "-V", "-N", "hvd-goyal-1h-resnet50", "-l",
            "select=32:ncpus=64:ngpus=8:mpiprocs=8"]


def test_launch_elastic_dry_run_checks_the_trainer_and_the_world_sizes(capsys):
    rc, out, err = launch(capsys, "elastic", GOYAL, "--data-remote", "--min-nodes", "30",
                          "--dry-run")
    # 30 and 31 nodes (240, 248 ranks) do not divide 8192
    assert rc == 2 and "--min-nodes: the job may shrink or grow to world sizes 240, 248" in err
    # 1 or 2 nodes (8, 16 ranks) both divide 8192
    rc, out, err = launch(capsys, "elastic", GOYAL, "--data-remote", "--nodes", "2",
                          "--min-nodes", "1", "--dry-run")
    assert rc == 0 and "--min-np 8 --max-np 16" in out
    # sharded optimizer state cannot survive the loss of a host: refused at check time
    rc, out, err = launch(capsys, "elastic", GOYAL, "--data-remote", "--nodes", "2",
                          "--min-nodes", "1", "--set", "optimizer.shard_optimizer_state=true",
                          "--dry-run")
    assert rc == 2 and "optimizer.shard_optimizer_state: must be false with --elastic" in err


def test_launch_reports_gradient_accumulation_when_the_per_gpu_batch_is_too_big(capsys):
    # Goyal on one node: 8192 / 8 = 1024 per GPU > max_per_rank_batch 32 -> 32 x 32
    rc, out, err = launch(capsys, "mpirun", GOYAL, "--nodes", "1", "--data-remote", "--check")
    assert rc == 0, err
    assert "# phase 0: per-GPU batch 1024 > train.max_per_rank_batch 32: gradients accumulated " \
           "over 32 micro-batches of 32" in out.splitlines()
    assert "written for 256 ranks" in out


def test_launch_dry_run_prints_the_predicted_time_to_train(capsys):
    # the job's own world size (4 nodes x 8 GPUs = 32 ranks, 256 per GPU, accumulated over
    # 8 micro-batches of 32), the config's model (ResNet-50) and optimizer (sgd)
    args = ["slurm", GOYAL, "--nodes", "4", "--data-remote", "--dry-run"]
    rc, out, err = launch(capsys, *args)
    assert rc == 0, err
    assert "# predicted time to train: give --gpu-throughput IMG_PER_S and --network" in out
    rc, out, err = launch(capsys, *args, "--gpu-throughput", "100", "--network", "100",
                          "--intra-node", "640")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines.index("# check passed") < lines.index(
        "# predicted time to train (model and assumptions: hvd_largebatch/schedules/timing.py)"
    ) < lines.index("# submit with:")
    assert "4 nodes x 8 GPUs" in out and "25,557,032 parameters" in out
    # 256 images per GPU (8 micro-batches) at 100 img/s: 2.56 s of compute in each phase
    rows = [line.split() for line in lines if line[:3] in {f"# {k}" for k in range(5)}][-5:]
    assert [(row[2], row[3], row[5]) for row in rows] == [("256", "(8x)", "2,560")] * 5
    total = next(line for line in lines if line.startswith("# predicted time to train: "))
    assert "h (" in total
    rc, _, err = launch(capsys, *args, "--gpu-throughput", "100")
    assert rc == 2 and "hvd-largebatch launch: error: --network: needed for 32 ranks" in err


def spec(**kw) -> JobSpec:
    return JobSpec(**{"launcher": "mpirun", "config": GOYAL, "data_remote": True, **kw})


def test_check_names_the_phase_and_the_node_counts_that_fit():
    with pytest.raises(ConfigError) as e:
        check_job(spec(config=config_path("smith_wrn_cifar10_increasing_batch")))
    # 128 on 256 ranks; the batches 128, 640, 3200, 5120 all divide by 8 x {1, 2, 4, 8, 16}
    assert e.value.key == "schedule.phases[0].global_batch"
    assert "world size 256" in str(e.value)
    assert str(e.value).endswith("8 GPUs each divide every global batch: 1, 2, 4, 8, 16")
    # every phase is checked: 25 x 8 = 200 ranks split 3200 but not 5120
    with pytest.raises(ConfigError) as e:
        check_job(spec(config=config_path("smith_wrn_cifar10_increased_momentum"), nodes=25))
    assert e.value.key == "schedule.phases[1].global_batch"


def test_check_looks_for_the_data_unless_it_is_declared_remote(tmp_path):
    missing = tmp_path / "imagenet"
    with pytest.raises(DataError, match="data.path does not exist.*--data-remote"):
        check_job(spec(data=str(missing), data_remote=False))
    (missing / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{missing / 'val'}: missing"):
        check_job(spec(data=str(missing), data_remote=False))
    (missing / "val").mkdir()
    assert f"data: {missing} found" in check_job(spec(data=str(missing), data_remote=False)).notes
    remote = check_job(spec(data="/lustre/imagenet"))
    assert "data: /lustre/imagenet declared remote (on the compute nodes): not checked here" in remote.notes
    with pytest.raises(ConfigError) as e:
        check_job(spec(data="s3://bucket/imagenet"))
    assert e.value.key == "data.path" and "is a URL" in str(e.value)


def test_check_validates_the_host_list(tmp_path):
    with pytest.raises(ConfigError, match="--hosts: lists 2 hosts, the job asks for --nodes 4"):
        check_job(spec(nodes=4, hosts="a:8,b:8"))
    with pytest.raises(ConfigError, match="host b has 4 slots"):
        check_job(spec(nodes=2, hosts="a:8,b:4"))
    with pytest.raises(ConfigError, match="horovodrun needs --hosts or --hostfile for 32 nodes"):
        check_job(spec(launcher="horovodrun"))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=8  # spare\n")
    assert "hosts: a, b" in check_job(spec(nodes=2, hostfile=str(hostfile))).notes
    nodefile = tmp_path / "nodefile"  # $PBS_NODEFILE: one line per slot
    nodefile.write_text("a\n" * 8 + "b\n" * 8)
    assert "hosts: a, b" in check_job(spec(nodes=2, hostfile=str(nodefile))).notes


def test_check_rejects_overrides_with_spaces_and_bad_counts():
    with pytest.raises(ConfigError, match="--set: expected key=value without spaces"):
        check_job(spec(overrides=("model.options={width: 4}",)))
    with pytest.raises(ConfigError, match="--nodes: must be >= 1"):
        check_job(spec(nodes=0))
    with pytest.raises(ConfigError, match="train.max_per_rank_batch"):
        check_job(spec(overrides=("train.max_per_rank_batch=0",)))


def fake_commands(tmp_path: Path, *names: str) -> Path:
    """Stand-ins for sbatch, qsub, kubectl, mpirun on PATH: each appends its argv (one line,
    shell-quoted) to <name>.log, its environment to <name>.env and its stdin to <name>.stdin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        script = bin_dir / name
        script.write_text(f"""#!/usr/bin/env bash
printf '%q ' "$@" >> {tmp_path}/{name}.log; echo >> {tmp_path}/{name}.log
env > {tmp_path}/{name}.env
if [[ ! -t 0 ]]; then cat > {tmp_path}/{name}.stdin; fi
""")
        script.chmod(0o755)
    return bin_dir


def recorded(tmp_path: Path, name: str) -> tuple[list[list[str]], dict[str, str]]:
    calls = [shlex.split(line) for line in (tmp_path / f"{name}.log").read_text().splitlines()]
    env = dict(line.split("=", 1) for line in (tmp_path / f"{name}.env").read_text().splitlines()
               if "=" in line)
    return calls, env


@pytest.mark.parametrize("launcher,command", [("slurm", "sbatch"), ("pbs", "qsub")])
def test_launch_submits_to_the_scheduler(capsys, monkeypatch, tmp_path, launcher, command):
    monkeypatch.setenv("PATH", f"{fake_commands(tmp_path, command)}:{os.environ['PATH']}")
    rc, out, err = launch(capsys, launcher, GOYAL, "--nodes", "16", "--data", "/lustre/imagenet",
                          "--data-remote", "--set", "train.seed=2")
    assert rc == 0, err
    (call,), env = recorded(tmp_path, command)
    assert call[-1] == str(LAUNCH / ("slurm.sbatch" if launcher == "slurm" else "pbs.sh"))
    assert "--nodes=16" in call if launcher == "slurm" else \
        "select=16:ncpus=64:ngpus=8:mpiprocs=8" in call
    assert (env["CONFIG"], env["NODES"], env["GPUS_PER_NODE"]) == (GOYAL, "16", "8")
    assert (env["DATA"], env["TRAIN_SET"]) == ("/lustre/imagenet", "train.seed=2")
    # the job checks itself again on its first node, data path included
    assert "CHECKED" not in env and "DATA_REMOTE" not in env


def test_launch_runs_the_mpirun_template(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{fake_commands(tmp_path, 'mpirun')}:{os.environ['PATH']}")
    rc, out, err = launch(capsys, "mpirun", GOYAL, "--nodes", "2", "--hosts", "a:8,b:8",
                          "--data-remote", "--output", str(tmp_path / "out"))
    assert rc == 0, err
    (preflight, train), env = recorded(tmp_path, "mpirun")
    assert_horovod_mpirun(["mpirun", *preflight], 16)
    assert preflight[-1] == str(LAUNCH / "preflight.py")
    assert_horovod_mpirun(["mpirun", *train], 16)
    assert_train(train, GOYAL, (f"output.dir={tmp_path / 'out'}",))
    assert env["CHECKED"] == "1"  # checked once, by `launch`


def test_launch_without_the_scheduler_command_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    rc, out, err = launch(capsys, "slurm", GOYAL, "--data-remote")
    assert rc == 2 and "sbatch not found" in err and "--dry-run" in err


def test_launch_mpijob_applies_the_manifest_with_kubectl(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{fake_commands(tmp_path, 'kubectl')}:{os.environ['PATH']}")
    rc, out, err = launch(capsys, "mpijob", GOYAL, "--nodes", "4")
    assert rc == 0, err
    (call,), _ = recorded(tmp_path, "kubectl")
    assert call == ["apply", "-f", "-"]
    job, configmap = yaml.safe_load_all((tmp_path / "kubectl.stdin").read_text())
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 4


# -- the MPIJob ---------------------------------------------------------------------------------

def test_mpijob_manifest_is_a_v2beta1_mpijob_that_runs_the_mpirun_template(capsys, tmp_path):
    rc, out, err = launch(capsys, "mpijob", GOYAL, "--data", "/data/imagenet", "--image",
                          "registry.example/hvd-largebatch:1", "--dry-run")
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    job, configmap = docs
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    assert job["spec"]["slotsPerWorker"] == 8
    replicas = job["spec"]["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"}
    assert replicas["Launcher"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 32
    worker = replicas["Worker"]["template"]["spec"]
    (container,) = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "registry.example/hvd-largebatch:1"
    assert container["command"] == ["/usr/sbin/sshd", "-De"]  # mpirun reaches workers by ssh
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == "/data/imagenet"
    assert mounts["output"] == "/workspace/runs/goyal_1h_resnet50"
    (launcher,) = replicas["Launcher"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in launcher["env"]}
    assert all(isinstance(v, str) for v in env.values())
    assert (env["NODES"], env["GPUS_PER_NODE"]) == ("32", "8")

    # the ConfigMap carries the config and every file the launcher runs
    assert (configmap["apiVersion"], configmap["kind"]) == ("v1", "ConfigMap")
    assert yaml.safe_load(configmap["data"]["job.yaml"]) == yaml.safe_load(Path(GOYAL).read_text())
    volume = next(v for v in replicas["Launcher"]["template"]["spec"]["volumes"]
                  if v.get("configMap"))
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    # lay the ConfigMap out as the pod sees it and run the launcher's command there
    root = tmp_path / "etc-hvd-largebatch"
    for item in volume["configMap"]["items"]:
        (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (root / item["path"]).write_text(configmap["data"][item["key"]])
    pod_env = {**env, "JOBS_DIR": str(root), "CONFIG": str(root / "configs/job.yaml"),
               "DRY_RUN": "1", "PATH": os.environ["PATH"]}
    command = [root / Path(a).relative_to("/etc/hvd-largebatch") if a.startswith("/etc/") else a
               for a in launcher["command"]]
    proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=pod_env)
    assert proc.returncode == 0, proc.stderr
    preflight, train = map(shlex.split, proc.stdout.splitlines())
    assert_horovod_mpirun(train, 256)
    assert_train(train, str(root / "configs/job.yaml"),
                 ("data.path=/data/imagenet", "output.dir=/workspace/runs/goyal_1h_resnet50"))


def test_launch_uses_the_launchers_beside_its_python(capsys, monkeypatch):
    # the venv's bin is not on PATH: the job must still use the horovodrun of this Python
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    rc, out, err = launch(capsys, "horovodrun", GOYAL, "--data", "/lustre/imagenet",
                          "--data-remote", "--dry-run", "--hosts",
                          ",".join(f"n{i}:8" for i in range(32)))
    assert rc == 0, err
    lines = out.splitlines()
    beside = str(Path(sys.executable).parent / "horovodrun")
    assert f"HOROVODRUN={beside}" in shlex.split(lines[lines.index("# submit with:") + 1])
    preflight, train = [shlex.split(x) for x in lines[lines.index("# the job runs:") + 1:]]
    assert preflight[2] == beside and train[0] == beside


def test_template_without_its_launcher_says_so_before_the_preflight(tmp_path):
    # run directly (not through `hvd-largebatch launch`) where horovodrun is not on PATH
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "CHECKED": "1", "NODES": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(LAUNCH / "horovodrun.sh")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("horovodrun.sh: error: horovodrun not found on PATH "
                                  "(/usr/bin:/bin): set HOROVODRUN to its path"), proc.stderr
    assert "pre-flight" not in proc.stdout + proc.stderr


# -- running the configs -------------------------------------------------------------------------

def test_mpirun_template_runs_a_config_end_to_end_on_two_cpu_ranks(tmp_path):
    """`hvd-largebatch launch mpirun` (check) -> mpirun.sh -> pre-flight allreduce -> train
    --synthetic, on 2 local ranks; the Smith 30-minute schedule doubles its batch mid-run."""
    out = tmp_path / "run"
    small = ["--set", "model.name=small_resnet", "--set", 'model.options={"width":4,"blocks":1}',
             "--set", "data.image_size=8", "--set", "output.tensorboard=false",
             "--set", "output.plots=false", "--set", "output.progress=false"]
    env = {**os.environ, **ROOT_ENV, "PREFLIGHT_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "hvd_largebatch.cli", "launch", "mpirun",
         config_path("smith_30min_resnet50"), "--nodes", "1", "--gpus-per-node", "2",
         "--synthetic", "--output", str(out), *small],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight ok: allreduce over 2 ranks on 1 hosts (cpu)" in proc.stdout
    summary = json.loads((tmp_path / "run-synthetic" / "summary.json").read_text())
    cfg = load_config(config_path("smith_30min_resnet50"))
    expected = rehearsal_schedule(build_schedule(cfg, None), 2)
    assert summary["updates"] == expected.total_updates and summary["world_size"] == 2


def test_every_config_rehearses_with_synthetic_data_on_two_ranks(tmp_path):
    """Each config through the trainer (`train --synthetic`, a small model on 8x8 images):
    every iteration runs with the global batch, lr and momentum of the config's schedule as
    the rehearsal scales it; LARS configs report trust ratios, SGD configs none."""
    import csv

    paths = [config_path(stem) for stem in sorted(PAPERS)]
    proc = run_ranks(REPO / "tests" / "mp" / "jobs_rehearsal.py", str(tmp_path), *paths,
                     np=2, timeout=240)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("REHEARSED ") == len(paths), proc.stdout
    for stem in sorted(PAPERS):
        cfg = load_config(config_path(stem))
        expected = rehearsal_schedule(build_schedule(cfg, None), 2)
        run_dir = tmp_path / f"{stem}-synthetic"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["updates"] == expected.total_updates, stem
        # the optimizer ran the update rule the config names (lars_32k: Algorithm 1 as written)
        groups = torch.load(run_dir / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
        assert {g["momentum_correction"] for g in groups} == {cfg.optimizer.momentum_correction}
        assert {g["denominator"] for g in groups} == {cfg.optimizer.denominator}
        with open(run_dir / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
        assert len(rows) == expected.total_updates, stem
        for row in rows:
            point = expected.at(int(row["epoch"]), int(row["step"]))
            assert int(row["global_batch"]) == point.global_batch, (stem, row)
            assert float(row["momentum"]) == pytest.approx(point.momentum), (stem, row)
            assert float(row["lr"]) == pytest.approx(point.lr), (stem, row)
        lars = cfg.optimizer.name == "lars"
        assert all(bool(r["trust_ratio_mean"]) is lars for r in rows), stem
