"""The environment a supervised command gets, and the nesting it makes possible.

A `pgfence run` gives its command two kinds of variables, both defined here, once:

- FENCE: the FENCE_* settings that name the fence (token, backend, lock file or etcd
  key and how to reach it), as resolved from flags and environment. `config` reads these
  variables (their names come from this table), and the command gets them back, so that
  a pgfence it starts (the `postgres` shim under a wrapped entrypoint, configured from the
  environment only) names the very fence we hold, also when ours came from flags.
- HELD: the PGFENCE_* facts about the fence held: generation, instance, location, and
  what the backend's Hold adds (`Hold.child_values()` gives the values, this table names
  the variables). From PGFENCE_INSTANCE and PGFENCE_LOCK that inner pgfence recognises
  its supervisor's fence (`supervising_instance`) and runs the server directly instead of
  refusing or taking the fence a second time.

Settings that do not name the fence (mode, TTL, the election timeout...) are not given
back: the command inherits them from our environment as it found them.
"""

from __future__ import annotations

from pgfence.frozen import Struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from pgfence.backends.base import Backend, Hold
    from pgfence.config import Settings

FILE = ("file",)
ETCD = ("etcd",)
BOTH = ("file", "etcd")

# How a value is written into the environment (and read back: config.resolve).
TEXT = "text"  # as is; left out when empty, which config reads as unset
SWITCH = "switch"  # "1" when on, left out when off (config's default)
MILLISECONDS = "milliseconds"  # whole milliseconds for a value Settings holds in seconds
DECIMAL = "decimal"  # a number, in decimal
HEX = "hex"  # a number in hex (etcd lease ids, as etcdctl prints and reads them)


class FenceVariable(Struct):
    """A FENCE_* variable naming the fence: the environment variable of the option
    `dest`, which sets the Settings attribute `field`."""

    name: str
    field: str  # dotted: "etcd.key" is settings.etcd.key, set by the option etcd_key
    backends: tuple[str, ...]  # the backends whose fence it names
    encoding: str
    child: bool = True  # the supervised command gets it

    @property
    def dest(self) -> str:
        return self.field.replace(".", "_")


class HeldVariable(Struct):
    """A PGFENCE_* variable: a fact about the fence held, for the supervised command."""

    name: str
    value: str  # the value it carries: COMMON_VALUES, or a key of Hold.child_values()
    backends: tuple[str, ...]
    encoding: str


# In the order the command gets them.
FENCE = (
    FenceVariable("FENCE_VARIABLE", "token", BOTH, TEXT),
    FenceVariable("FENCE_BACKEND", "backend", BOTH, TEXT),
    FenceVariable("FENCE_LOCK_FILE", "lock_file", FILE, TEXT),
    FenceVariable("FENCE_ETCD_ENDPOINTS", "etcd.endpoints", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_KEY", "etcd.key", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_USER", "etcd.user", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_PASSWORD_FILE", "etcd.password_file", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_CA_FILE", "etcd.ca_file", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_CERT_FILE", "etcd.cert_file", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_KEY_FILE", "etcd.key_file", ETCD, TEXT),
    FenceVariable("FENCE_ETCD_ALLOW_INSECURE", "etcd.allow_insecure", ETCD, SWITCH),
    # The cluster's property, not the fence's name.
    FenceVariable(
        "FENCE_ETCD_ELECTION_TIMEOUT", "etcd.election_timeout", ETCD, MILLISECONDS, child=False
    ),
)
ETCD_SETTINGS = tuple(v for v in FENCE if v.field.startswith("etcd."))  # EtcdSettings

GENERATION = "PGFENCE_GENERATION"
INSTANCE = "PGFENCE_INSTANCE"
LOCK = "PGFENCE_LOCK"
# Every Hold has these; `location` is the backend's (lock file path or etcd:KEY).
COMMON_VALUES = ("generation", "instance", "location")
HELD = (
    HeldVariable("PGFENCE_LOCK_FILE", "lock_file", FILE, TEXT),
    HeldVariable("PGFENCE_ETCD_KEY", "etcd_key", ETCD, TEXT),
    HeldVariable("PGFENCE_ETCD_LEASE", "etcd_lease", ETCD, HEX),
    HeldVariable(GENERATION, "generation", BOTH, DECIMAL),  # the fencing token
    HeldVariable(INSTANCE, "instance", BOTH, TEXT),
    HeldVariable(LOCK, "location", BOTH, TEXT),
)


def fence_variable(dest: str) -> str:
    """The environment variable of the option `dest`, which names the fence."""
    for variable in FENCE:
        if variable.dest == dest:
            return variable.name
    raise KeyError(dest)


def fence_environment(settings: Settings) -> dict[str, str]:
    """The FENCE_* settings that name this fence, for the supervised command."""
    env: dict[str, str] = {}
    for variable in FENCE:
        if variable.child and settings.backend in variable.backends:
            value: object = settings
            for part in variable.field.split("."):
                value = getattr(value, part)
            text = _written(variable.encoding, value)
            if text is not None:
                env[variable.name] = text
    return env


def held_environment(hold: Hold, location: str) -> dict[str, str]:
    """The PGFENCE_* facts about `hold`, the fence at `location`, for the command."""
    values: dict[str, object] = {
        "generation": hold.generation,
        "instance": hold.instance,
        "location": location,
        **hold.child_values(),
    }
    env: dict[str, str] = {}
    for variable in HELD:
        text = _written(variable.encoding, values.get(variable.value))
        if text is not None:
            env[variable.name] = text
    return env


def supervising_instance(backend: Backend, env: Mapping[str, str]) -> str | None:
    """The instance of the pgfence that supervises us holding `backend`'s fence, by the
    variables it gave us and checked against the fence itself; None when `env` names no
    instance, another fence, or an instance that does not hold it."""
    instance = env.get(INSTANCE)
    if instance and env.get(LOCK) == backend.location() and backend.held_by_instance(instance):
        return instance
    return None


def _written(encoding: str, value: object) -> str | None:
    """`value` as the environment holds it; None: the variable is left out."""
    if value is None or value == "" or value is False:
        return None
    if encoding == SWITCH:
        return "1"
    if encoding == HEX:
        assert isinstance(value, int)
        return f"{value:x}"
    if encoding in (TEXT, DECIMAL):
        return str(value)
    raise ValueError(f"no way to write {encoding} values into the environment")
