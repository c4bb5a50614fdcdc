"""Hypothesis over the wire: junk for every RPC of a real server on 127.0.0.1.

Whatever a client sends, the server answers with a typed status (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...) or a result: never INTERNAL or UNKNOWN (a bug), never
UNAVAILABLE (the engine faulted and is restarting) and never a hang (every call has a deadline).
Health is checked after every example and after every batch. Strings with lone surrogates, which
protobuf refuses to serialize, go out as their raw (invalid UTF-8) bytes and must be
INVALID_ARGUMENT; so must hand-built messages with invalid UTF-8 in any string field.

Paths are bounded: no generated path can leave this module's temp dir (`..` is capped), so even a
broken path policy could not write outside it.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adapter_fusion.engines.builtin import Limits
from adapter_fusion.merge.methods import METHODS
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from adapter_fusion.server.app import SERVICE_NAME, ServerConfig
from adapter_fusion.server.served import ServiceLimits

from .conftest import FIGURES, SERVING, bump, code_of, health_status, serving, wait_health

FORBIDDEN = {
    grpc.StatusCode.INTERNAL,  # a bug
    grpc.StatusCode.UNKNOWN,  # an exception grpc itself had to catch
    grpc.StatusCode.UNAVAILABLE,  # the engine is restarting: something faulted it
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a hang
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
CALL_TIMEOUT = 30.0
PLACEHOLDER = "\ue000"  # stands for a lone surrogate while protobuf serializes; swapped for its bytes after
LONE_SURROGATE = "\ud800".encode("utf-8", "surrogatepass")  # b"\xed\xa0\x80": not valid UTF-8
MAX_REQUEST_BYTES = 256 << 10


def fuzz_settings(examples: int):
    return settings(
        derandomize=True,
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written outside tmp dirs (no .hypothesis/)
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found (CI time stays bounded)
        print_blob=False,
    )


# ---- the server under fuzz --------------------------------------------------------------------


@dataclass
class Fuzz:
    address: str
    stub: pb_grpc.AdapterFusionStub
    raw: dict[str, object]  # method name -> a callable sending bytes as they are
    top: Path  # nothing generated reaches above this
    adapters: Path  # the read root
    outputs: Path  # the write root
    codes: Counter = field(default_factory=Counter)


@pytest.fixture(scope="module")
def fuzz(tok_base: Path, tok_adapters: list[Path], tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("fuzz")
    deep = top / "a" / "b"  # roots sit 2 levels down, so escapes through `..` have room to land inside `top`
    adapters, outputs = deep / "adapters", deep / "outputs"
    adapters.mkdir(parents=True)
    for source in tok_adapters[:2]:
        shutil.copytree(source, adapters / source.name)  # alpha, beta
    (adapters / "empty").mkdir()
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    (adapters / "truncated").mkdir()
    shutil.copy(tok_adapters[0] / "adapter_config.json", adapters / "truncated")
    (adapters / "truncated" / "adapter_model.safetensors").write_bytes((tok_adapters[0] / "adapter_model.safetensors").read_bytes()[:300])
    (adapters / "nan").mkdir()
    shutil.copy(tok_adapters[0] / "adapter_config.json", adapters / "nan")
    tensors = load_file(tok_adapters[0] / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = math.nan
    save_file(tensors, adapters / "nan" / "adapter_model.safetensors")
    (adapters / "file.txt").write_text("not an adapter")
    (top / "outside").mkdir()
    config = ServerConfig(
        base_dir=tok_base,
        store_dir=deep / "store",
        adapter_roots=[adapters],
        output_roots=[outputs],
        port=0,
        limits=Limits(
            max_new_tokens=8, default_new_tokens=4, max_prompt_tokens=64, max_target_tokens=16, max_queue=64, max_batch=8,
            memory_budget_bytes=256 << 20, max_faults=10**6, restart_delay_s=0.05,  # a fault found here must not end the module
        ),
        service_limits=ServiceLimits(max_examples=8, max_text_bytes=2048, inline_cache_size=4, max_search_budget=4, max_search_parallel=4),
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with serving(config) as server:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.AdapterFusionStub(channel)
        raw = {}
        for method in pb.DESCRIPTOR.services_by_name["AdapterFusion"].methods:
            path = f"/{SERVICE_NAME}/{method.name}"
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            raw[method.name] = kind(path, request_serializer=None, response_deserializer=None)
        stub.LoadAdapter(pb.LoadAdapterRequest(name="alpha", path="alpha"), timeout=CALL_TIMEOUT)
        stub.LoadAdapter(pb.LoadAdapterRequest(name="beta", path=str(adapters / "beta")), timeout=CALL_TIMEOUT)
        mix = pb.Recipe(method="linear", sources=[pb.Source(adapter="alpha", weight=0.5), pb.Source(adapter="beta", weight=0.5)])
        stub.ComposeAdapter(pb.ComposeAdapterRequest(name="mix", recipe=mix), timeout=CALL_TIMEOUT)
        yield Fuzz(server.address, stub, raw, top, adapters, outputs)
        channel.close()
    FIGURES["fuzz_status_codes"] = dict(sorted((k.name, v) for k, v in FUZZ_CODES.items()))
    FIGURES["fuzz_status_codes_per_rpc"] = {rpc: dict(sorted(codes.items())) for rpc, codes in sorted(RPC_CODES.items())}


FUZZ_CODES: Counter = Counter()
DETAILS: Counter = Counter()  # (rpc, code, start of the message): what the cases ran into
RPC_CODES: defaultdict[str, Counter] = defaultdict(Counter)


# ---- sending a case ---------------------------------------------------------------------------


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _swap(value):
    """Lone surrogates replaced by PLACEHOLDER (3 UTF-8 bytes, like a surrogate's)."""
    if isinstance(value, str):
        return "".join(PLACEHOLDER if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, dict):
        return {_swap(k): _swap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v) for v in value]
    return value


def send(f: Fuzz, rpc: str, cls, fields: dict) -> grpc.StatusCode:
    """One case: through the generated stub, or as raw bytes if a string holds a lone surrogate
    (protobuf will not serialize those; a hostile client sends the bytes anyway)."""
    wait_health(f.address, SERVING, timeout=10)  # a case runs against a serving engine, never a restarting one
    bump("fuzz_cases")
    bump(f"fuzz_cases_{rpc}")
    if _has_surrogate(fields):
        data = cls(**_swap(fields)).SerializeToString().replace(PLACEHOLDER.encode(), LONE_SURROGATE)
        code, details = code_of(lambda: f.raw[rpc](data, timeout=CALL_TIMEOUT))
        bump("fuzz_cases_lone_surrogate_bytes")
        expected = {grpc.StatusCode.INVALID_ARGUMENT}
        if len(data) > MAX_REQUEST_BYTES:  # grpc refuses an over-size message before anyone parses it
            expected.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert code in expected, f"{rpc} with a lone surrogate's bytes answered {code.name}: {details}"
    else:
        request = cls(**fields)
        code, details = code_of(lambda: getattr(f.stub, rpc)(request, timeout=CALL_TIMEOUT))
        assert code not in FORBIDDEN, f"{rpc} answered {code.name}: {details}\nrequest: {str(request)[:3000]}"
    FUZZ_CODES[code] += 1
    DETAILS[(rpc, code.name, details[:48])] += 1
    RPC_CODES[rpc][code.name] += 1
    status = health_status(f.address)
    assert status == SERVING, f"health is {status} after {rpc} ({code.name}: {details}); request fields: {str(fields)[:2000]}"
    return code


def after_batch(f: Fuzz, rpc: str) -> None:
    wait_health(f.address, SERVING, timeout=5)
    names = {a.name for a in f.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=CALL_TIMEOUT).adapters}
    assert {"alpha", "beta", "mix"} <= names, names
    print(f"fuzz {rpc}: {FIGURES.get(f'fuzz_cases_{rpc}', 0)} cases; status codes {dict(RPC_CODES[rpc])}")
    common = [(n, code, text) for (r, code, text), n in DETAILS.most_common() if r == rpc][:10]
    for n, code, text in common:
        print(f"    {n:4d} {code} {text!r}")


def bounded(f: Fuzz, path: str, base: Path) -> str:
    """`path`, kept inside the module's temp dir: an absolute path elsewhere is moved under it, a
    relative one that climbs out becomes a bounded escape attempt (still outside every root)."""

    def inside(p: str) -> bool:
        target = os.path.normpath(p if p.startswith("/") else os.path.join(base, p))
        return target == str(f.top) or target.startswith(str(f.top) + os.sep)

    if inside(path):
        return path
    if path.startswith("/") and inside(str(f.top) + path):
        return str(f.top) + path
    escape = "../../../outside/" + (os.path.basename(os.path.normpath(path)) or "x")[:50]
    return str(f.top / "outside" / escape.rsplit("/", 1)[-1]) if path.startswith("/") else escape


# ---- strategies: mostly valid, some fields junk ------------------------------------------------
# Each field is valid about 7 times in 8 and junk otherwise, so many cases get past the first
# checks and reach the deeper code (merging, decoding, writing) with one or two odd values.


def mostly(valid, junk):
    return st.sampled_from([False] * 7 + [True]).flatmap(lambda is_junk: junk if is_junk else valid)


SPECIAL_TEXT = [
    "", " ", "\x00", "\n\n\n", "<|im_end|>", "<|im_start|>assistant\n", "{{ 7 * 7 }}{% raise %}", "\u202e\u200b\ufeff", "🙂" * 4,
    "\ufffd", "a" * 3000, "word " * 500, "a " * 900, "x" * 70000,
]
plain = st.text(alphabet=string.ascii_letters + string.digits + " .,!?'\n", min_size=1, max_size=40)
junk_text = st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_TEXT))
text_field = mostly(plain, junk_text)
NAME_CHARS = string.ascii_letters + string.digits + "._-"
valid_name = st.tuples(st.sampled_from(string.ascii_lowercase + string.digits), st.text(alphabet=NAME_CHARS, max_size=11)).map("".join)
junk_name = st.one_of(
    st.sampled_from(["", ".", "..", "a/b", "x" * 128, "x" * 129, "-lead", ".hidden", "inline-0000", "ghost", "group", "a\x00b"]),
    st.text(max_size=12),
)
known = st.sampled_from(["alpha", "beta", "mix"])
adapter_ref = mostly(known, st.one_of(junk_name, valid_name))
new_name = mostly(valid_name, st.one_of(junk_name, known))
junk_float = st.one_of(
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, -0.0, 5e-324, 1e4, 1e4 + 1, -1e-300])
)
junk_float32 = st.one_of(
    st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -0.0, 1e-45, 1e-40, 1e-30, 100.5, -1.0])
)
uint32 = st.one_of(st.integers(0, 16), st.sampled_from([2**32 - 1, 2**31, 10**9, 10**6]), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.sampled_from([2**64 - 1, 2**63, 1, 0]), st.integers(0, 2**64 - 1))
int64 = st.one_of(st.integers(-5, 5), st.integers(0, 2**32 + 5), st.sampled_from([-(2**63), 2**63 - 1, -1, 2**32]), st.integers(-(2**63), 2**63 - 1))
VALID_PARAMETERS = {  # per method: parameter -> a valid value strategy (numbers; strings go to options)
    "ties": {"density": st.floats(0.01, 1.0)},
    "dare_linear": {"density": st.floats(0.01, 1.0)},
    "dare_ties": {"density": st.floats(0.01, 1.0)},
    "magnitude_prune": {"density": st.floats(0.01, 1.0)},
    "breadcrumbs": {"density": st.floats(0.01, 0.9), "gamma": st.floats(0.0, 0.09)},
    "della": {"density": st.floats(0.2, 0.8), "epsilon": st.floats(0.0, 0.19), "lambda_": st.floats(0.0, 2.0)},
    "slerp": {"t": st.floats(0.0, 1.0)},
    "learned": {"steps": st.integers(1, 3)},  # the fuzz server caps steps at 4
    "regmean": {"alpha": st.floats(0.0, 0.99)},
}
VALID_OPTIONS = {  # per method: option -> its valid values
    "ties": {"majority_sign": ["total", "frequency"], "divide_by": ["count", "weights"]},
    "dare_linear": {"rescale": ["true", "false"]},
    "dare_ties": {"rescale": ["true", "false"], "majority_sign": ["total", "frequency"], "divide_by": ["count", "weights"]},
    "della": {"majority_sign": ["total", "frequency"], "divide_by": ["count", "weights"]},
    "factor_linear": {"weight_split": ["lorahub", "sqrt"]},
}
JUNK_PARAMETERS = ["density", "gamma", "epsilon", "lambda_", "lambda", "t", "parallel_threshold", "rescale", "rank", ""]


class Junk:
    """Which part of a case is junk: none (about half the cases), one named part, or all ("*").
    One odd value at a time reaches deeper than many at once, which the first check refuses."""

    def __init__(self, draw, parts: list[str], allowed: bool = True) -> None:
        self.draw = draw
        self.choice = draw(st.sampled_from([None] * len(parts) + [*parts, "*"])) if allowed else None

    def __call__(self, part: str, valid, junk):
        return self.draw(junk if self.choice in (part, "*") else valid)


RECIPE_PARTS = ["method", "count", "adapter", "weight", "parameters", "junk parameters", "options", "rank", "examples"]
SHARED_EXAMPLES = {"learned"}  # one set for all sources; regmean and fisher take one per source


@st.composite
def recipes(draw, junk_allowed: bool = True) -> dict:
    junk = Junk(draw, RECIPE_PARTS, junk_allowed)
    method = junk("method", st.sampled_from(sorted(METHODS)), st.one_of(st.sampled_from(["", "TIES", "svd ", "dense"]), st.text(max_size=10)))
    count = junk("count", st.just(2) if method == "slerp" else st.integers(1, 3), st.integers(0, 5))
    sources = []
    for _ in range(count):
        source = {"adapter": junk("adapter", known, st.one_of(junk_name, valid_name))}
        if draw(st.booleans()):
            source["weight"] = junk("weight", st.floats(-2.0, 2.0), junk_float)
        if method in ("regmean", "fisher"):
            source["examples"] = junk("examples", examples_strategy(valid=True, most=2), examples_strategy(valid=False))
        sources.append(source)
    parameters = {}
    for key, value in VALID_PARAMETERS.get(method, {}).items():
        if draw(st.booleans()):
            parameters[key] = junk("parameters", value, junk_float)
    parameters.update(junk("junk parameters", st.just({}), st.dictionaries(st.one_of(st.sampled_from(JUNK_PARAMETERS), st.text(max_size=8)), junk_float, min_size=1, max_size=2)))
    options = {}
    for key, values in VALID_OPTIONS.get(method, {}).items():
        if draw(st.booleans()):
            options[key] = junk("options", st.sampled_from(values), st.one_of(st.sampled_from(["", "nan", "TRUE", "1"]), st.text(max_size=6)))
    recipe = {"method": method, "sources": sources, "parameters": parameters, "options": options, "seed": draw(int64)}
    if method in SHARED_EXAMPLES:
        recipe["examples"] = junk("examples", examples_strategy(valid=True, most=2), examples_strategy(valid=False))
        recipe["raw"] = draw(st.booleans())
    rank = junk("rank", st.one_of(st.none(), st.integers(1, 16)), st.one_of(st.sampled_from([0, 1000, 2**32 - 1]), uint32))
    if rank is not None:
        recipe["rank"] = rank
    return recipe


def examples_strategy(valid: bool, most: int = 4):
    if valid:
        return st.lists(st.fixed_dictionaries({"input": plain, "target": plain}), min_size=1, max_size=most)
    return st.lists(st.fixed_dictionaries({"input": text_field, "target": text_field}), max_size=12)


def path_strategy(valid: list[str], extra: list[str]):
    component = st.one_of(
        st.sampled_from([".", "..", "..", "", "alpha", "beta", "empty", "broken", "nan", "truncated", "file.txt", "adapter_config.json", "out"]),
        st.text(alphabet="abcxyz.-_ ~$*?", min_size=1, max_size=10),
        st.sampled_from(["p" * 255, "p" * 256, "q" * 300, "é" * 127, "é" * 128]),
        st.text(max_size=8),
    )
    relative = st.lists(component, min_size=1, max_size=6).map("/".join)
    junk = st.one_of(
        relative,
        relative.map(lambda p: "/" + p),  # absolute (bounded() keeps it under the module's temp dir)
        st.sampled_from(extra),
        st.just("x" * 5000),  # over PATH_MAX as given
        st.just("/".join(["y" * 200] * 20) + "/" + "z" * 70),  # under PATH_MAX as given, over it once joined to a root
        st.lists(st.just("w" * 250), min_size=14, max_size=17).map("/".join),
        st.text(max_size=10).map(lambda s: s + "\x00" + "tail"),
    )
    return st.one_of(st.sampled_from(valid), valid_name, junk, junk)  # half junk: paths are what this is about


def inject_surrogate(fields: dict, which: int) -> dict:
    """A copy of `fields` with a lone surrogate inside its `which`-th string value (round robin)."""
    slots: list[tuple[object, object]] = []

    def walk(value, parent, key):
        if isinstance(value, str):
            slots.append((parent, key))
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(value[k], value, k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, value, i)

    copied = copy.deepcopy(fields)
    walk(copied, None, None)
    if slots:
        parent, key = slots[which % len(slots)]
        text = parent[key]
        parent[key] = text[: len(text) // 2] + "\udc80" + text[len(text) // 2 :]
    return copied


spoil = st.sampled_from([False] * 9 + [True])  # True: put a lone surrogate in some string of the case


def maybe_spoiled(fields: dict, spoiled: bool, which: int) -> dict:
    return inject_surrogate(fields, which) if spoiled else fields


# ---- one test per RPC ---------------------------------------------------------------------------


def test_fuzz_load_adapter(fuzz: Fuzz) -> None:
    valid = ["alpha", "beta", str(fuzz.adapters / "alpha"), "alpha/../beta", "./alpha/", "empty", "broken", "truncated", "nan", "file.txt"]
    extra = ["/", "/etc", "/etc/passwd", "/dev/null", "/proc/self", "~", "~/x", ".", "..", str(fuzz.adapters)]

    @fuzz_settings(120)
    @given(name=new_name, path=path_strategy(valid, extra), pin=st.booleans(), spoiled=spoil, which=st.integers(0, 3))
    def case(name: str, path: str, pin: bool, spoiled: bool, which: int) -> None:
        if not path.startswith(("/etc", "/dev", "/proc")) and path not in ("/", "~"):  # reads of system paths are harmless: keep them
            path = bounded(fuzz, path, fuzz.adapters)
        send(fuzz, "LoadAdapter", pb.LoadAdapterRequest, maybe_spoiled({"name": name, "path": path, "pin": pin}, spoiled, which))

    case()
    after_batch(fuzz, "LoadAdapter")


def test_fuzz_unload_and_list(fuzz: Fuzz) -> None:
    @fuzz_settings(60)
    @given(name=new_name.filter(lambda n: n not in ("alpha", "beta", "mix")), load_first=st.booleans(), spoiled=spoil)
    def case(name: str, load_first: bool, spoiled: bool) -> None:
        if load_first:
            code_of(lambda: fuzz.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path="alpha"), timeout=CALL_TIMEOUT))
        send(fuzz, "UnloadAdapter", pb.UnloadAdapterRequest, maybe_spoiled({"name": name}, spoiled, 0))
        send(fuzz, "ListAdapters", pb.ListAdaptersRequest, {})

    case()
    after_batch(fuzz, "UnloadAdapter")


def test_fuzz_compose_adapter(fuzz: Fuzz) -> None:
    @fuzz_settings(150)
    @given(name=new_name, recipe=recipes(), pin=st.booleans(), spoiled=spoil, which=st.integers(0, 7))
    def case(name: str, recipe: dict, pin: bool, spoiled: bool, which: int) -> None:
        send(fuzz, "ComposeAdapter", pb.ComposeAdapterRequest, maybe_spoiled({"name": name, "recipe": recipe, "pin": pin}, spoiled, which))

    case()
    after_batch(fuzz, "ComposeAdapter")


GENERATE_PARTS = ["adapter", "recipe", "prompt", "messages", "roles", "max_new_tokens", "temperature", "top_p", "top_k", "stop"]


@st.composite
def generate_fields(draw) -> dict:
    junk = Junk(draw, GENERATE_PARTS)
    fields: dict = {}
    target = draw(st.sampled_from(["adapter", "adapter", "recipe", "base"]))
    if target == "adapter":
        fields["adapter"] = junk("adapter", known, st.one_of(junk_name, valid_name))
    elif target == "recipe":
        fields["recipe"] = draw(recipes(junk_allowed=junk.choice in ("recipe", "*")))
    if draw(st.booleans()):
        fields["prompt"] = junk("prompt", plain, junk_text)
    else:
        role = junk("roles", st.just(st.sampled_from(["system", "user", "assistant"])), st.just(st.one_of(st.sampled_from(["", "tool", "User"]), st.text(max_size=6))))
        count = junk("messages", st.integers(1, 3), st.integers(0, 6))
        content = junk("messages", st.just(plain), st.just(junk_text))
        fields["messages"] = {"messages": draw(st.lists(st.fixed_dictionaries({"role": role, "content": content}), min_size=count, max_size=count))}
    fields["max_new_tokens"] = junk("max_new_tokens", st.integers(0, 8), uint32)
    temperatures = st.one_of(st.just(0.0), st.floats(0.0, 100.0, width=32), st.sampled_from([1e-45, 1e-40, 1e-30, 1e-8, 0.01, 1.0, 100.0]))
    fields["temperature"] = junk("temperature", temperatures, junk_float32)
    fields["top_p"] = junk("top_p", st.one_of(st.just(0.0), st.floats(0.0, 1.0, width=32)), junk_float32)
    fields["top_k"] = junk("top_k", st.integers(0, 100), uint32)
    fields["seed"] = draw(int64)
    fields["stop"] = junk("stop", st.lists(plain, max_size=3), st.lists(st.one_of(junk_text, st.sampled_from(["", "a", " ", "x" * 5000])), max_size=5))
    return fields


def test_fuzz_generate(fuzz: Fuzz) -> None:
    @fuzz_settings(150)
    @given(fields=generate_fields(), spoiled=spoil, which=st.integers(0, 7))
    def case(fields: dict, spoiled: bool, which: int) -> None:
        send(fuzz, "Generate", pb.GenerateRequest, maybe_spoiled(fields, spoiled, which))

    case()
    after_batch(fuzz, "Generate")


@st.composite
def score_fields(draw) -> dict:
    junk = Junk(draw, ["examples", "adapter", "recipe"])
    fields: dict = {"examples": junk("examples", examples_strategy(valid=True), examples_strategy(valid=False)), "raw": draw(st.booleans())}
    target = draw(st.sampled_from(["adapter", "adapter", "recipe", "base"]))
    if target == "adapter":
        fields["adapter"] = junk("adapter", known, st.one_of(junk_name, valid_name))
    elif target == "recipe":
        fields["recipe"] = draw(recipes(junk_allowed=junk.choice in ("recipe", "*")))
    return fields


def test_fuzz_score(fuzz: Fuzz) -> None:
    @fuzz_settings(100)
    @given(fields=score_fields(), spoiled=spoil, which=st.integers(0, 7))
    def case(fields: dict, spoiled: bool, which: int) -> None:
        send(fuzz, "Score", pb.ScoreRequest, maybe_spoiled(fields, spoiled, which))

    case()
    after_batch(fuzz, "Score")


def _write_paths(f: Fuzz):
    valid = ["exported", "out/sub/deeper", str(f.outputs / "abs-out"), "./dot/./x"]
    extra = [".", "..", "", str(f.outputs), str(f.outputs.parent), str(f.top / "outside" / "x"), "out/adapter_config.json/x", "../adapters/alpha", "../store/alpha"]
    return path_strategy(valid, extra)


dtypes = mostly(st.sampled_from(["", "float32", "bfloat16", "float16"]), st.one_of(st.sampled_from(["float64", "int8", "FLOAT32", " float32"]), st.text(max_size=8)))


def test_fuzz_export_adapter(fuzz: Fuzz) -> None:
    @fuzz_settings(100)
    @given(name=adapter_ref, path=_write_paths(fuzz), dtype=dtypes, overwrite=st.booleans(), spoiled=spoil, which=st.integers(0, 3))
    def case(name: str, path: str, dtype: str, overwrite: bool, spoiled: bool, which: int) -> None:
        fields = {"name": name, "path": bounded(fuzz, path, fuzz.outputs), "dtype": dtype, "overwrite": overwrite}
        send(fuzz, "ExportAdapter", pb.ExportAdapterRequest, maybe_spoiled(fields, spoiled, which))

    case()
    after_batch(fuzz, "ExportAdapter")


def test_fuzz_bake_model(fuzz: Fuzz) -> None:
    @fuzz_settings(60)
    @given(
        adapter=adapter_ref,
        path=_write_paths(fuzz),
        dtype=dtypes,
        shard=mostly(st.one_of(st.just(0), st.integers(1, 1 << 24)), uint64),
        overwrite=st.booleans(),
        spoiled=spoil,
        which=st.integers(0, 3),
    )
    def case(adapter: str, path: str, dtype: str, shard: int, overwrite: bool, spoiled: bool, which: int) -> None:
        fields = {"adapter": adapter, "output_path": bounded(fuzz, path, fuzz.outputs), "dtype": dtype, "max_shard_bytes": shard, "overwrite": overwrite}
        send(fuzz, "BakeModel", pb.BakeModelRequest, maybe_spoiled(fields, spoiled, which))

    case()
    after_batch(fuzz, "BakeModel")


SEARCH_PARTS = ["adapters", "examples", "budget", "optimizer", "output_name", "parallel", "l1", "method", "per", "lr", "bound", "batch_size"]


@st.composite
def search_fields(draw) -> dict:
    junk = Junk(draw, SEARCH_PARTS)
    fields = {
        "adapters": junk("adapters", st.lists(known, min_size=1, max_size=3), st.lists(st.one_of(known, junk_name, valid_name), max_size=4)),
        "examples": junk("examples", examples_strategy(valid=True, most=3), examples_strategy(valid=False)),
        "budget": junk("budget", st.integers(0, 4), uint32),
        "optimizer": junk(
            "optimizer",
            st.sampled_from(["", "NGOpt", "OnePlusOne", "RandomSearch", "TwoPointsDE", "CMA", "PSO", "DE"]),
            st.one_of(st.sampled_from(["nope", "ngopt"]), st.text(max_size=8)),
        ),
        "seed": draw(int64),
        "output_name": junk("output_name", valid_name, st.one_of(junk_name, known)),
        "parallel": junk("parallel", st.integers(0, 4), st.one_of(st.just(10**9), uint32)),
        "raw": draw(st.booleans()),
        "pin": draw(st.booleans()),
    }
    if draw(st.booleans()):
        fields["l1"] = junk("l1", st.floats(0.0, 1.0), junk_float)
    if draw(st.booleans()):  # learned: lorahub's optimizer and parallel are refused beside it
        fields |= {"optimizer": "", "parallel": 0}
        fields["method"] = junk("method", st.just("learned"), st.one_of(st.sampled_from(["LoraHub", "learned ", "adam"]), st.text(max_size=8)))
        fields["per"] = junk("per", st.sampled_from(["", "source", "layer", "module"]), st.one_of(st.sampled_from(["row", "Source"]), st.text(max_size=8)))
        fields["batch_size"] = junk("batch_size", st.integers(0, 3), uint32)
        for key, valid in (("lr", st.floats(1e-3, 0.5)), ("bound", st.floats(0.1, 2.0))):
            if draw(st.booleans()):
                fields[key] = junk(key, valid, junk_float)
    return fields


def test_fuzz_search_weights(fuzz: Fuzz) -> None:
    @fuzz_settings(80)
    @given(fields=search_fields(), spoiled=spoil, which=st.integers(0, 7))
    def case(fields: dict, spoiled: bool, which: int) -> None:
        send(fuzz, "SearchWeights", pb.SearchWeightsRequest, maybe_spoiled(fields, spoiled, which))

    case()
    after_batch(fuzz, "SearchWeights")


# ---- bytes that are not valid UTF-8 in string fields, built by hand -----------------------------

BAD_UTF8 = {
    "lone surrogate": b"\xed\xa0\x80",
    "overlong slash": b"\xc0\xaf",
    "truncated": b"ok\xe2\x82",
    "invalid byte": b"\xff\xfe",
    "continuation only": b"\x80abc",
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _message_field(number: int, body: bytes) -> bytes:
    return _string_field(number, body)  # same wire type (length-delimited)


def _bad_requests(bad: bytes) -> list[tuple[str, str, bytes]]:
    """(rpc, field, serialized request with `bad` as that string field's bytes): every string
    field of every request, nested ones (recipe, messages, examples, map keys and values) included.
    Each starts from a valid request, so only the bad string can make it fail."""
    ok = {
        "LoadAdapter": pb.LoadAdapterRequest(name="n", path="alpha").SerializeToString(),
        "UnloadAdapter": pb.UnloadAdapterRequest(name="n").SerializeToString(),
        "ComposeAdapter": pb.ComposeAdapterRequest(name="n", recipe=pb.Recipe(method="linear", sources=[pb.Source(adapter="alpha")])).SerializeToString(),
        "Generate": pb.GenerateRequest(prompt="hi", max_new_tokens=2).SerializeToString(),
        "Score": pb.ScoreRequest(examples=[pb.Example(input="a", target="b")]).SerializeToString(),
        "ExportAdapter": pb.ExportAdapterRequest(name="alpha", path="never").SerializeToString(),
        "BakeModel": pb.BakeModelRequest(adapter="alpha", output_path="never").SerializeToString(),
        "SearchWeights": pb.SearchWeightsRequest(adapters=["alpha"], examples=[pb.Example(input="a", target="b")], budget=1, output_name="never").SerializeToString(),
    }
    recipe = lambda inner: _message_field(2, inner)  # noqa: E731 (Recipe is field 2 of Compose, Generate and Score)
    cases = [
        ("LoadAdapter", "name", ok["LoadAdapter"] + _string_field(1, bad)),
        ("LoadAdapter", "path", ok["LoadAdapter"] + _string_field(2, bad)),
        ("UnloadAdapter", "name", ok["UnloadAdapter"] + _string_field(1, bad)),
        ("ComposeAdapter", "name", ok["ComposeAdapter"] + _string_field(1, bad)),
        ("ComposeAdapter", "recipe.method", ok["ComposeAdapter"] + recipe(_string_field(1, bad))),
        ("ComposeAdapter", "recipe.sources.adapter", ok["ComposeAdapter"] + recipe(_message_field(2, _string_field(1, bad)))),
        ("ComposeAdapter", "recipe.parameters key", ok["ComposeAdapter"] + recipe(_message_field(3, _string_field(1, bad)))),
        ("ComposeAdapter", "recipe.options value", ok["ComposeAdapter"] + recipe(_message_field(4, _string_field(1, b"k") + _string_field(2, bad)))),
        ("Generate", "adapter", ok["Generate"] + _string_field(1, bad)),
        ("Generate", "prompt", ok["Generate"] + _string_field(3, bad)),
        ("Generate", "recipe.method", ok["Generate"] + recipe(_string_field(1, bad))),
        ("Generate", "messages.content", pb.GenerateRequest(max_new_tokens=2).SerializeToString() + _message_field(4, _message_field(1, _string_field(1, b"user") + _string_field(2, bad)))),
        ("Generate", "messages.role", pb.GenerateRequest(max_new_tokens=2).SerializeToString() + _message_field(4, _message_field(1, _string_field(1, bad) + _string_field(2, b"hi")))),
        ("Generate", "stop", ok["Generate"] + _string_field(10, bad)),
        ("Score", "adapter", ok["Score"] + _string_field(1, bad)),
        ("Score", "examples.input", ok["Score"] + _message_field(3, _string_field(1, bad) + _string_field(2, b"t"))),
        ("Score", "examples.target", ok["Score"] + _message_field(3, _string_field(1, b"i") + _string_field(2, bad))),
        ("ExportAdapter", "name", ok["ExportAdapter"] + _string_field(1, bad)),
        ("ExportAdapter", "path", ok["ExportAdapter"] + _string_field(2, bad)),
        ("ExportAdapter", "dtype", ok["ExportAdapter"] + _string_field(3, bad)),
        ("BakeModel", "adapter", ok["BakeModel"] + _string_field(1, bad)),
        ("BakeModel", "output_path", ok["BakeModel"] + _string_field(2, bad)),
        ("BakeModel", "dtype", ok["BakeModel"] + _string_field(3, bad)),
        ("SearchWeights", "adapters", ok["SearchWeights"] + _string_field(1, bad)),
        ("SearchWeights", "optimizer", ok["SearchWeights"] + _string_field(4, bad)),
        ("SearchWeights", "output_name", ok["SearchWeights"] + _string_field(7, bad)),
        ("SearchWeights", "examples.input", ok["SearchWeights"] + _message_field(2, _string_field(1, bad) + _string_field(2, b"t"))),
    ]
    return cases


@pytest.mark.parametrize("kind", sorted(BAD_UTF8))
def test_invalid_utf8_bytes_are_invalid_argument(fuzz: Fuzz, kind: str) -> None:
    failures = []
    for rpc, field_name, data in _bad_requests(BAD_UTF8[kind]):
        code, details = code_of(lambda: fuzz.raw[rpc](data, timeout=CALL_TIMEOUT))
        bump("fuzz_cases")
        bump("fuzz_cases_invalid_utf8")
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            failures.append(f"{rpc}.{field_name}: {code.name} {details[:200]}")
    assert not failures, failures
    assert health_status(fuzz.address) == SERVING


def test_garbage_bytes_are_invalid_argument(fuzz: Fuzz) -> None:
    """Bytes that are not a protobuf message at all (truncated varint, wrong wire types)."""
    failures = []
    for rpc in fuzz.raw:
        for data in (b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0b", b"\x08" + b"\xff" * 11):
            code, details = code_of(lambda: fuzz.raw[rpc](data, timeout=CALL_TIMEOUT))
            bump("fuzz_cases")
            bump("fuzz_cases_garbage_bytes")
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                failures.append(f"{rpc} {data!r}: {code.name} {details[:200]}")
    assert not failures, failures
    assert health_status(fuzz.address) == SERVING


# ---- what the fuzzer found, pinned: each of these answered INTERNAL before its fix ---------------


def _not_internal(f: Fuzz, rpc: str, call, allowed: set[grpc.StatusCode]) -> list[str]:
    wait_health(f.address, SERVING, timeout=10)
    code, details = code_of(call)
    bump("fuzz_pinned_cases")
    return [] if code in allowed else [f"{rpc}: {code.name} {details[:160]}"]


def test_search_weights_seed_outside_uint32_is_not_internal(fuzz: Fuzz) -> None:
    """SearchRequest.seed is int64; lorahub.search passes it to np.random.RandomState, which takes
    only 0..2**32-1 (ValueError, so INTERNAL)."""
    failures = []
    for i, seed in enumerate((-1, 2**32, -(2**63), 2**63 - 1)):
        request = pb.SearchWeightsRequest(adapters=["alpha"], examples=[pb.Example(input="a b", target="c")], budget=1, seed=seed, output_name=f"pinned-seed-{i}")
        failures += _not_internal(fuzz, f"SearchWeights seed={seed}", lambda: fuzz.stub.SearchWeights(request, timeout=CALL_TIMEOUT), {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT})
    assert not failures, failures


def test_paths_over_path_max_once_joined_to_a_root_are_not_internal(fuzz: Fuzz) -> None:
    """Under 4096 bytes as given (so paths._check_text lets it through), over PATH_MAX once joined to
    the root: os.stat/mkdir raise OSError(ENAMETOOLONG) in PathPolicy.readable (file.exists()) and in
    atomic_directory (mkdir/mkdtemp): INTERNAL."""
    path = "/".join(["y" * 200] * 20) + "/" + "z" * 70  # 4090 bytes
    assert len(path) < 4096 and len(str(fuzz.outputs / path)) > 4096
    allowed = {grpc.StatusCode.INVALID_ARGUMENT}
    failures = _not_internal(fuzz, "LoadAdapter", lambda: fuzz.stub.LoadAdapter(pb.LoadAdapterRequest(name="longpath", path=path), timeout=CALL_TIMEOUT), allowed)
    failures += _not_internal(fuzz, "ExportAdapter", lambda: fuzz.stub.ExportAdapter(pb.ExportAdapterRequest(name="alpha", path=path), timeout=CALL_TIMEOUT), allowed)
    failures += _not_internal(fuzz, "BakeModel", lambda: list(fuzz.stub.BakeModel(pb.BakeModelRequest(adapter="alpha", output_path=path + "b"), timeout=CALL_TIMEOUT)), allowed)
    assert not failures, failures


def test_output_names_near_name_max_are_not_internal(fuzz: Fuzz) -> None:
    """A last component of 242..255 bytes passes the 255-byte check, but atomic_directory's temp
    dir `.NAME.XXXXXXXX.tmp` is 14 bytes longer: mkdtemp raises OSError(ENAMETOOLONG): INTERNAL."""
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    failures = []
    for n in (250, 255):
        name = "p" * n
        failures += _not_internal(fuzz, f"ExportAdapter {n} bytes", lambda: fuzz.stub.ExportAdapter(pb.ExportAdapterRequest(name="alpha", path=name, overwrite=True), timeout=CALL_TIMEOUT), allowed)
        failures += _not_internal(fuzz, f"BakeModel {n} bytes", lambda: list(fuzz.stub.BakeModel(pb.BakeModelRequest(adapter="alpha", output_path="b" + name[1:], overwrite=True), timeout=CALL_TIMEOUT)), allowed)
    assert not failures, failures


def test_dare_linear_with_a_tiny_density_is_not_internal(fuzz: Fuzz) -> None:
    """density=1e-300 passes the parameter model; DARE's 1/density rescale overflows to inf in
    float32 and LowRankDelta.from_dense's SVD raises torch.linalg.LinAlgError: INTERNAL (also for an
    inline recipe in Generate or Score)."""
    recipe = pb.Recipe(method="dare_linear", sources=[pb.Source(adapter="alpha"), pb.Source(adapter="beta")], parameters={"density": 1e-300})
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    failures = _not_internal(fuzz, "ComposeAdapter", lambda: fuzz.stub.ComposeAdapter(pb.ComposeAdapterRequest(name="pinned-dare", recipe=recipe), timeout=CALL_TIMEOUT), allowed)
    failures += _not_internal(fuzz, "Generate (inline recipe)", lambda: list(fuzz.stub.Generate(pb.GenerateRequest(recipe=recipe, prompt="hi", max_new_tokens=2), timeout=CALL_TIMEOUT)), allowed)
    assert not failures, failures
