"""What a local cluster starts (``LocalClusterConfig``), its defaults, and the model and
placement spec it starts from (docs/local-cluster.md)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = "var/demo"
DEFAULT_CLUSTER = "local"
DEFAULT_SPEC = "deploy/placement/mixed.json"
DEFAULT_PRESET = "demo"


@dataclass(frozen=True)
class LocalClusterConfig:
    """What ``shardrec demo`` / ``shardrec cluster up`` start. Paths are absolute: a given
    checkpoint and features root are made absolute here (``absolute_uri``), so the commands
    the cluster runs read them from any directory.

    The model is the demo model of ``preset`` (generated under ``workdir``), or the checkpoint
    at ``checkpoint_uri`` with the features below ``features_root`` (default: its own). With
    ``spec`` None the planner places the model's tables (``control.placement.planned_spec``).
    """

    workdir: Path
    spec: Path | None
    preset: str = DEFAULT_PRESET
    nodes: int = 3
    seed: int = 0
    cluster: str = DEFAULT_CLUSTER
    frontend_port: int = 0
    start_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    shards_only: bool = False
    python: str = sys.executable
    checkpoint_uri: str | None = None
    features_root: str | None = None
    # docs/security.md: TLS on every port (a local CA under <workdir>/pki), and tokens, the
    # cluster token, ZooKeeper ACLs and a Redis password (under <workdir>/secrets).
    tls: bool = False
    auth: bool = False
    # Further ``frontend serve`` flags for every frontend it starts (benchmarks: e.g. the same
    # admission settings for every system compared), and ``shard serve`` flags for every shard.
    frontend_args: tuple[str, ...] = ()
    shard_args: tuple[str, ...] = ()
    # Observability (docs/observability.md): every shard and frontend serves /metrics; with
    # ``prometheus`` a Prometheus server scrapes them every ``scrape_interval_s``;
    # ``service_args`` are further flags for every shard and frontend (e.g. tracing).
    metrics: bool = True
    prometheus: bool = False
    scrape_interval_s: float = 5.0
    service_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from services.core.checkpoint.storage import absolute_uri

        if self.features_root is not None and self.checkpoint_uri is None:
            raise ConfigError("--features needs --checkpoint (a preset's demo model has its own features)")
        for name in ("checkpoint_uri", "features_root"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, absolute_uri(value))
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if not self.cluster or "/" in self.cluster:
            raise ConfigError(f"--cluster must be non-empty and contain no '/', got {self.cluster!r}")
        if self.start_timeout_s <= 0 or self.stop_grace_s < 0:
            raise ConfigError("--start-timeout-s must be > 0 and --stop-grace-s >= 0")
        if self.prometheus and not self.metrics:
            raise ConfigError("--prometheus needs the processes' /metrics endpoints")
        if self.scrape_interval_s <= 0:
            raise ConfigError(f"--scrape-interval-s must be > 0, got {self.scrape_interval_s}")

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def secrets_dir(self) -> Path:
        return self.workdir / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def checkpoint(self) -> Path | str:
        """The checkpoint root served: ``checkpoint_uri`` when given, else the demo model's
        (one per preset and seed)."""
        if self.checkpoint_uri is not None:
            return self.checkpoint_uri
        return self.workdir / "model" / f"{self.preset}-seed{self.seed}"

    @property
    def features(self) -> Path | str:
        """The root whose ``features/{users,items}.npz`` are loaded into Redis."""
        return self.features_root if self.features_root is not None else self.checkpoint

    @property
    def redis_prefix(self) -> str:
        return f"{self.cluster}:"


def resolve_spec(spec: str) -> Path:
    """The placement spec file: as given, else relative to the repository root (so the
    default works from any directory). ConfigError naming both places if neither exists."""
    p = Path(spec)
    if p.is_file():
        return p.resolve()
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return (REPO_ROOT / p).resolve()
    raise ConfigError(f"placement spec {spec!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")


def existing_model(root: Path, preset: str) -> tuple[int, str] | None:
    """(version, "") when ``root`` holds a complete demo model of ``preset`` (a complete
    version whose model spec is the preset's, and both feature files); (0, why not) when
    something else is there; None when ``root`` does not exist."""
    from services.core import synth
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.errors import CheckpointError

    if not root.exists():
        return None
    try:
        reader = CheckpointReader(str(root))
        version = reader.latest_version()
        manifest = reader.manifest(version)
    except CheckpointError as e:
        return 0, str(e)
    if manifest.model != synth.model_spec(preset):
        return 0, f"version {version} is not the {preset!r} preset"
    for side in ("user", "item"):
        if not reader.store.exists(synth.feature_file(side)):
            return 0, f"{synth.feature_file(side)} is missing"
    return version, ""
