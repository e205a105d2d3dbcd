"""Stand-ins for the official postgres images, and pgfence's images built on them.

Docker Hub and apt.postgresql.org cannot be reached from the machines this project is
tested on, so `FROM postgres:15` cannot be pulled. A stand-in is built instead, from the
official Dockerfile itself (tests/docker/official/, MIT, copied unchanged from
docker-library/postgres) by `standin_dockerfile`, which replaces exactly the steps that
download from outside Debian's archive and keeps everything else as upstream has it:
users and uid 999, ENV (PGDATA, PATH, LANG), VOLUME, the entrypoint scripts, STOPSIGNAL,
EXPOSE, ENTRYPOINT and CMD. Every replaced step is matched exactly once, or the build
stops: a changed upstream Dockerfile is noticed, not half-transformed.

| tag | base | binaries | PGDATA | VOLUME |
|---|---|---|---|---|
| 15 | bookworm-slim | pg 15 | /var/lib/postgresql/data | same |
| 17 | trixie-slim | pg 17 | /var/lib/postgresql/data | same |
| 18 | trixie-slim | pg 17 | /var/lib/postgresql/18/docker | /var/lib/postgresql |

Trixie has no postgresql-18, so the 18 stand-in has the 18 image's layout and ENV
(PG_MAJOR=18) on 17's binaries, reachable at 18's paths through two symlinks.

Where a real (unlabelled) image of that name exists locally it is used as it is; with
PGFENCE_DOCKER_PULL=1 the harness first tries `docker pull` (off by default: pulling talks to
a registry, and the machines here may only talk to loopback and Debian's archive). Every
image the harness builds carries the label org.pgfence.inputs, a hash of everything it was
built from; an image whose label matches is reused, so later runs build nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness import docker as d

TESTS = Path(__file__).resolve().parent.parent
OFFICIAL = TESTS / "docker" / "official"
MAKE_BASE = TESTS / "docker" / "make-debian-slim"
REPO = TESTS.parent
INPUTS_LABEL = "org.pgfence.inputs"
STANDIN_LABEL = "org.pgfence.standin"
# Bumped by hand whenever this module changes how it builds (the inputs hash covers files only).
RECIPE = "1"


@dataclasses.dataclass(frozen=True)
class Standin:
    major: str  # the layout's major version: the image tag and ENV PG_MAJOR
    release: str  # Debian release of the base image
    official: str  # folder of the official Dockerfile under tests/docker/official
    binaries: str  # Debian's postgresql-N package providing the binaries
    pgdata: str
    volume: str

    @property
    def tag(self) -> str:
        return f"postgres:{self.major}"

    @property
    def bin_dir(self) -> str:
        return f"/usr/lib/postgresql/{self.major}/bin"


STANDINS = {
    "15": Standin(
        "15",
        "bookworm",
        "15/bookworm",
        "15",
        "/var/lib/postgresql/data",
        "/var/lib/postgresql/data",
    ),
    "17": Standin(
        "17", "trixie", "17/trixie", "17", "/var/lib/postgresql/data", "/var/lib/postgresql/data"
    ),
    "18": Standin(
        "18", "trixie", "18/trixie", "17", "/var/lib/postgresql/18/docker", "/var/lib/postgresql"
    ),
}


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256(RECIPE.encode())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:20]


def _tree_digest(root: Path) -> str:
    parts: list[bytes | str] = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            parts += [
                str(path.relative_to(root)),
                oct(path.stat().st_mode & 0o777),
                path.read_bytes(),
            ]
    return _digest(*parts)


def image_id(ref: str) -> str:
    return d.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def _usable(ref: str, inputs: str) -> bool:
    """True when `ref` is a real image (not ours) or ours built from exactly these inputs."""
    labels = d.image_labels(ref)
    pull = os.environ.get("PGFENCE_DOCKER_PULL") == "1"
    if labels is None and pull and d.docker("pull", ref, check=False, timeout=600).returncode == 0:
        labels = d.image_labels(ref)
    if labels is None:
        return False
    if STANDIN_LABEL not in labels:
        return True  # the real image: used as it is
    return labels.get(INPUTS_LABEL) == inputs


# -- debian:<release>-slim ------------------------------------------------------------------


def ensure_base(release: str) -> str:
    tag = f"debian:{release}-slim"
    inputs = _digest(release, MAKE_BASE.read_bytes())
    if not _usable(tag, inputs):
        subprocess.run(
            [
                str(MAKE_BASE),
                release,
                tag,
                f"{STANDIN_LABEL}=debootstrap",
                f"{INPUTS_LABEL}={inputs}",
            ],
            check=True,
            timeout=1800,
            env=dict(os.environ, DOCKER=d.client()),
        )
    return tag


# -- postgres:NN ----------------------------------------------------------------------------

_GOSU = """\
# pgfence stand-in: Debian's gosu package instead of the release download from GitHub
# (/usr/sbin/gosu instead of /usr/local/bin/gosu; the entrypoint finds it on PATH).
RUN set -eux; \\
\tapt-get update; \\
\tapt-get install -y --no-install-recommends gosu; \\
\trm -rf /var/lib/apt/lists/*; \\
\tgosu --version; \\
\tgosu nobody true
"""

_INSTALL = """\
# pgfence stand-in: Debian's postgresql-{binaries} instead of the PGDG repository's package
# (same postgresql-common step that disables the main cluster, same .pyc clean-up).{links}
RUN set -ex; \\
\texport PYTHONDONTWRITEBYTECODE=1; \\
\tapt-get update; \\
\tapt-get install -y --no-install-recommends postgresql-common; \\
\tsed -ri 's/#(create_main_cluster) .*$/\\1 = false/' /etc/postgresql-common/createcluster.conf; \\
\tapt-get install -y --no-install-recommends postgresql-{binaries}; \\
\trm -rf /var/lib/apt/lists/*; \\{link_cmds}
\tfind /usr -name '*.pyc' -type f -exec bash -c \\
\t\t'for pyc; do dpkg -S "$pyc" &> /dev/null || rm -vf "$pyc"; done' -- '{{}}' +; \\
\tpostgres --version
"""

_LINKS = """
# The 18 layout on 17's binaries: PATH and the sample-config step below use $PG_MAJOR (18).
# PostgreSQL finds its share directory from its resolved executable path, so 17's binaries
# still use 17's files through these links."""

_LINK_CMDS = """
\tln -s {binaries} /usr/lib/postgresql/{major}; \\
\tln -s {binaries} /usr/share/postgresql/{major}; \\"""


def split_instructions(text: str) -> list[str]:
    """The Dockerfile as blocks: one per instruction (with its continuation lines and the
    comments inside it) and one per run of comment/blank lines between instructions."""
    blocks: list[str] = []
    current: list[str] = []
    continued = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if continued:
            current.append(line)
            if stripped and not stripped.startswith("#"):
                continued = stripped.endswith("\\")
            if not continued:
                blocks.append("".join(current))
                current = []
            continue
        if not stripped or stripped.startswith("#"):
            blocks.append(line)
            continue
        current = [line]
        continued = stripped.endswith("\\")
        if not continued:
            blocks.append("".join(current))
            current = []
    if current:
        blocks.append("".join(current))
    return blocks


def standin_dockerfile(standin: Standin) -> str:
    """The official Dockerfile with its download steps replaced by Debian's packages."""
    text = (OFFICIAL / standin.official / "Dockerfile").read_text()
    blocks = split_instructions(text)
    is_18_on_17 = standin.binaries != standin.major
    rules: list[tuple[str, str]] = [
        (r"^ENV GOSU_VERSION ", "# pgfence stand-in: no GOSU_VERSION (gosu comes from Debian)\n"),
        (r"tianon/gosu/releases/download", _GOSU),
        (
            r"keyserver\.ubuntu\.com",
            "# pgfence stand-in: no PGDG signing key (no PGDG repository)\n",
        ),
        (r"^ENV PG_VERSION ", "# pgfence stand-in: no PG_VERSION pin (Debian's package)\n"),
        (
            r"apt\.postgresql\.org",
            _INSTALL.format(
                binaries=standin.binaries,
                links=_LINKS if is_18_on_17 else "",
                link_cmds=_LINK_CMDS.format(binaries=standin.binaries, major=standin.major)
                if is_18_on_17
                else "",
            ),
        ),
    ]
    for pattern, replacement in rules:
        hits = [i for i, block in enumerate(blocks) if re.search(pattern, block, re.M)]
        if len(hits) != 1:
            raise RuntimeError(
                f"{standin.official}/Dockerfile: {len(hits)} steps match {pattern!r}, expected 1"
            )
        blocks[hits[0]] = replacement
    out = "".join(blocks)
    for kept in (
        f"ENV PGDATA {standin.pgdata}",
        f"VOLUME {standin.volume}",
        "STOPSIGNAL SIGINT",
        'CMD ["postgres"]',
        'ENTRYPOINT ["docker-entrypoint.sh"]',
        "--uid=999",
    ):
        if kept not in out:
            raise RuntimeError(
                f"{standin.official}/Dockerfile: {kept!r} missing after transforming it"
            )
    header = (
        "# Generated by tests/harness/standins.py from\n"
        f"# tests/docker/official/{standin.official}/Dockerfile (docker-library/postgres, MIT):\n"
        "# a stand-in for the official image, built from Debian's archive.\n"
    )
    return header + out


def ensure_standin(major: str) -> Standin:
    standin = STANDINS[major]
    base = ensure_base(standin.release)
    dockerfile = standin_dockerfile(standin)
    context_files = [OFFICIAL / "docker-entrypoint.sh", OFFICIAL / "docker-ensure-initdb.sh"]
    inputs = _digest(dockerfile, image_id(base), *(p.read_bytes() for p in context_files))
    if not _usable(standin.tag, inputs):
        dangling = _dangling_volumes()
        with tempfile.TemporaryDirectory(prefix="pgfence-standin-") as ctx:
            for path in context_files:
                shutil.copy2(path, ctx)
            d.build(
                standin.tag,
                ctx,
                dockerfile_text=dockerfile,
                labels={STANDIN_LABEL: f"postgres-{major}", INPUTS_LABEL: inputs},
            )
        # The classic builder's containers for the steps after VOLUME leave an empty
        # anonymous volume behind: remove the ones this build left, and only empty ones.
        for name in _dangling_volumes() - dangling:
            path = d.docker("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout
            if re.fullmatch(r"[0-9a-f]{64}", name) and not os.listdir(path.strip()):
                d.docker("volume", "rm", name, check=False)
    return standin


def _dangling_volumes() -> set[str]:
    return set(d.docker("volume", "ls", "-q", "--filter", "dangling=true").stdout.split())


# -- pgfence's images -----------------------------------------------------------------------


# The tree the pgfence images are built from: this checkout, or another one
# (PGFENCE_IMAGE_SOURCE=/path/to/checkout) to test its Dockerfile and package.
def image_source() -> Path:
    return Path(os.environ.get("PGFENCE_IMAGE_SOURCE", str(REPO))).resolve()


def _stage_context(source: Path, ctx: Path) -> None:
    """The build context both Dockerfiles need: the package, the launcher, the zipapp."""
    shutil.copytree(
        source / "src" / "pgfence",
        ctx / "src" / "pgfence",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    shutil.copytree(source / "docker", ctx / "docker")
    (ctx / "examples").mkdir()
    shutil.copytree(source / "examples" / "shim", ctx / "examples" / "shim")
    build_zipapp(ctx / "dist" / "pgfence.pyz", source)


def build_zipapp(output: Path, source: Path | None = None) -> None:
    """`scripts/build-zipapp --output OUTPUT` of the image source tree."""
    source = source or image_source()
    subprocess.run(
        ["python3", str(source / "scripts" / "build-zipapp"), "--output", str(output)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _without_syntax_line(text: str) -> str:
    # `# syntax=docker/dockerfile:1` makes BuildKit pull its frontend from Docker Hub; the
    # engine's built-in frontend understands these Dockerfiles without it.
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("# syntax=")
    )


def ensure_image(kind: str, major: str) -> str:
    """Build docker/Dockerfile ("fence") or examples/shim/Dockerfile ("shim") on postgres:MAJOR."""
    standin = ensure_standin(major)
    dockerfile_path = {"fence": "docker/Dockerfile", "shim": "examples/shim/Dockerfile"}[kind]
    tag = f"pgfence-test/{kind}:{major}"
    with tempfile.TemporaryDirectory(prefix="pgfence-image-") as staging:
        ctx = Path(staging)
        _stage_context(image_source(), ctx)
        dockerfile = _without_syntax_line((ctx / dockerfile_path).read_text())
        inputs = _digest(_tree_digest(ctx), dockerfile, image_id(standin.tag))
        labels = d.image_labels(tag)
        if labels is None or labels.get(INPUTS_LABEL) != inputs:
            d.build(
                tag,
                str(ctx),
                dockerfile_text=dockerfile,
                build_args={"PG_MAJOR": major},
                labels={STANDIN_LABEL: f"{kind}-{major}", INPUTS_LABEL: inputs},
                buildkit=True,
            )
    return tag
