"""Every setting diffmine reads, declared once.

Each field is an environment variable with the DIFFMINE_ prefix (DIFFMINE_HOME, DIFFMINE_PORT...);
the CLI's global flags override them by building a Settings with explicit values.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
#: An access token shorter than this is refused: a guessable token is no lock.
MIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFMINE_", extra="ignore")

    home: Path = Field(Path("diffmine-data"), description="data directory: database, files, indexes")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in home")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), or a torch device")
    token: str | None = Field(None, description="access token; when set, every request needs it "
                              f"(at least {MIN_TOKEN_LENGTH} characters)")
    # The web boundary (docs/security.md, "The web boundary").
    allowed_hosts: str = Field("", description="more host names the web app answers to, "
                               "comma-separated (always: 127.0.0.1, localhost, [::1] and the "
                               "host it listens on); '*' turns the Host check off")
    allow_no_token: bool = Field(False, description="serve on a non-loopback address without an "
                                 "access token (refused otherwise)")
    allowed_bases: str = Field("", description="base weights the web's run form may name besides "
                               "model folders under the data directory: folders or hub ids, "
                               "comma-separated")
    # Scoring and DIFT features on a Ray cluster (worker/ray_backend.py); unset: in the worker.
    ray_address: str | None = Field(None, description="Ray cluster for scoring and DIFT features: "
                                    "'local' starts Ray on this machine, anything else is "
                                    "ray.init's address (auto, ray://head:10001)")
    ray_actors: int | None = Field(None, description="Ray actors holding the denoiser (default: "
                                   "one per GPU of the cluster, else one per CPU)")

    lease_seconds: float = Field(30.0, gt=0, description="seconds a worker's claim on a job lasts "
                                 "without a heartbeat; once it runs out, another worker may take the "
                                 "job over (`diffmine worker --lease` overrides it)")

    # Ingest limits: an upload beyond them is refused whole.
    max_upload_bytes: int = 20 * 2**30
    max_zip_entries: int = 2_000_000
    max_zip_ratio: float = 200.0
    max_image_pixels: int = Field(64_000_000, description="largest image, in pixels, checked "
                                  "before it is decoded; decoding takes at most 8 bytes a pixel")
    max_file_bytes: int = Field(256 * 2**20, description="largest single file of an upload (an "
                                "image, a manifest): each is read into memory whole")
    min_images_per_label: int = 5
    thumbnail_px: int = 128

    # Memory per server process (docs/security.md, "Memory per request").
    max_inline_ingests: int = Field(1, ge=0, description="uploaded zips small enough to ingest "
                                    "within their request that one server process ingests at "
                                    "once; more become ingest jobs for the worker")
    page_cache_bytes: int = Field(64 * 2**20, ge=0, description="bytes of rendered gallery pages, "
                                  "label menus and sample lists one server process keeps (an "
                                  "LRU; an entry above a quarter of it is not kept; 0: none)")
    # Job creation: a dataset's queued and running jobs (but translations, which are cached per
    # setting, and ingests) beyond this are refused with a clear message (429 on the web).
    max_pending_jobs_per_dataset: int = Field(20, ge=1, description="queued and running jobs a "
                                              "dataset may have at once (translations apart)")

    @field_validator("port")
    @classmethod
    def _port_in_range(cls, port: int) -> int:
        if not 1 <= port <= 65535:
            raise ValueError(f"a port is between 1 and 65535, got {port}")
        return port

    @field_validator("token")
    @classmethod
    def _token_long_enough(cls, token: str | None) -> str | None:
        if not token:
            return None  # DIFFMINE_TOKEN="" means no token
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"the access token has {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'")
        return token

    @property
    def extra_allowed_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    @property
    def allowed_base_list(self) -> list[str]:
        return [b.strip() for b in self.allowed_bases.split(",") if b.strip()]

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'diffmine.sqlite'}"

    @property
    def images_dir(self) -> Path:
        return self.home_dir / "images"

    @property
    def thumbs_dir(self) -> Path:
        return self.home_dir / "thumbs"

    @property
    def models_dir(self) -> Path:
        return self.home_dir / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home_dir / "runs"

    @property
    def staging_dir(self) -> Path:
        return self.home_dir / "staging"
