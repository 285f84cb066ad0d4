"""Specification of safe checkpoint loading (effcompile/checkpoint.py) and of the other files read.

Loading runs no code from a file (a crafted pickle's ``__reduce__`` never fires); every bad file —
missing, empty, truncated, corrupt, foreign, of another format version, from a model transformed
differently, with tensors that do not fit — raises ``effcompile.CheckpointError`` naming the file,
and leaves the model, the optimizer and the RNG exactly as they were.  A fuzz test mutates a real
checkpoint a few hundred times: each load ends in CheckpointError or in a load that validates.
"""

import collections
import io
import os
import pickle
import random
import time
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F

import effcompile
from effcompile import checkpoint as ckpt
from effcompile.models import get_model

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------ helpers
def _batch(image_size=4, n=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, image_size, image_size, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _build(kind="mlp", passes=("decorrelation", "sample_selection"), seed=0, steps=2, optimizer_cls=torch.optim.Adam):
    """A small transformed zoo model (pass state in its state_dict) trained for ``steps`` steps."""
    torch.manual_seed(seed)
    image_size = 4 if kind == "mlp" else 8
    kwargs = {"hidden": 16} if kind == "mlp" else {"widths": (4, 8)}
    model = get_model(kind, image_size=image_size, **kwargs)
    x, y = _batch(image_size)
    configs = {"decorrelation": effcompile.Decorrelation(input_layers=True),
               "sample_selection": effcompile.SampleSelection(keep=0.5, strategy="loss")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *[configs[name] for name in passes], example_inputs=(x,))
    optimizer = optimizer_cls(model.parameters(), lr=1e-2)
    step = effcompile.train_step(model, F.cross_entropy, optimizer)
    for _ in range(steps):
        step(x, y)
    return model, optimizer, step, (x, y)


def _snapshot(model, optimizer):
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    return state, {"state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in entry.items()}
                             for k, entry in optimizer_state["state"].items()},
                   "param_groups": [dict(group) for group in optimizer_state["param_groups"]]}, torch.get_rng_state()


def _assert_same(snapshot, model, optimizer):
    state, optimizer_state, rng = snapshot
    current = model.state_dict()
    assert list(current) == list(state)
    for key, value in state.items():
        assert current[key].dtype == value.dtype and torch.equal(current[key], value), key
    now = optimizer.state_dict()
    assert now["param_groups"] == optimizer_state["param_groups"]
    assert set(now["state"]) == set(optimizer_state["state"])
    for key, entry in optimizer_state["state"].items():
        assert set(now["state"][key]) == set(entry)
        for name, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(now["state"][key][name], value), (key, name)
            else:
                assert now["state"][key][name] == value
    assert torch.equal(torch.get_rng_state(), rng)


def _refused(path, model, optimizer, match):
    """Loading ``path`` raises CheckpointError naming it (and ``match``); nothing changed."""
    before = _snapshot(model, optimizer)
    with pytest.raises(effcompile.CheckpointError, match=match) as info:
        effcompile.load_checkpoint(path, model, optimizer)
    assert os.fspath(path) in str(info.value) and info.value.path == os.fspath(path)
    assert isinstance(info.value, ValueError)
    _assert_same(before, model, optimizer)
    return info.value


def _payload(path):
    return torch.load(path, weights_only=True)


def _resave(payload, path, seal=True):
    torch.save(ckpt._seal(payload) if seal else payload, path)
    return path


class _Evil:
    """A pickle whose loading creates ``marker`` (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def trained(tmp_path):
    model, optimizer, step, batch = _build()
    path = tmp_path / "ckpt.pt"
    effcompile.save_checkpoint(path, model, optimizer, extra={"step": 2, "losses": [1.5, 1.25], "note": "ok"})
    return model, optimizer, step, batch, path


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_round_trip_restores_model_optimizer_rng_and_pass_state(kind, tmp_path):
    model, optimizer, step, batch = _build(kind)
    path = tmp_path / "ckpt.pt"
    extra = {"step": 2, "nested": {"t": torch.arange(3), "xs": [1, 2.5, None, True, "s", (1, 2)]}}
    effcompile.save_checkpoint(path, model, optimizer, extra=extra)
    expected_draw = torch.rand(4)  # what the RNG gives right after the save
    saved = _snapshot(model, optimizer)
    continued = [float(step(*batch)) for _ in range(3)]

    resumed_model, resumed_optimizer, resumed_step, _ = _build(kind, seed=7, steps=0)
    torch.manual_seed(999)
    loaded = effcompile.load_checkpoint(path, resumed_model, resumed_optimizer)
    assert loaded["step"] == 2 and torch.equal(loaded["nested"]["t"], torch.arange(3))
    assert loaded["nested"]["xs"] == [1, 2.5, None, True, "s", (1, 2)]
    assert torch.equal(torch.rand(4), expected_draw)
    torch.set_rng_state(saved[2])
    _assert_same(saved, resumed_model, resumed_optimizer)
    pass_keys = [key for key in resumed_model.state_dict() if "decorrelation" in key or "sample_selector" in key]
    assert any("decorrelation.matrix" in key for key in pass_keys) and any("sample_selector" in key for key in pass_keys)
    assert [float(resumed_step(*batch)) for _ in range(3)] == continued


def test_checkpoint_is_plain_data_with_a_checksum_and_writes_leave_no_temporary(trained, tmp_path):
    *_, path = trained
    payload = torch.load(path, weights_only=True)  # loads with the safe unpickler, nothing allow-listed
    assert payload["format_version"] == ckpt.FORMAT_VERSION == 2
    assert payload["checksum"]["algorithm"] == "sha256" and len(payload["checksum"]["digest"]) == 64
    assert payload["checksum"] == ckpt._checksum(payload)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_save_refuses_objects_in_extra_and_keeps_the_old_file(trained, tmp_path):
    model, optimizer, *_, path = trained
    before = path.read_bytes()
    for bad in ({"codec": _Evil(tmp_path / "never")}, {"s": {1, 2}}, {"f": F.relu}):
        with pytest.raises(effcompile.CheckpointError, match="not plain data|plain data") as info:
            effcompile.save_checkpoint(path, model, optimizer, extra=bad)
        assert str(path) in str(info.value) and "extra[" in str(info.value)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_checkpoint_error_pickles():
    error = effcompile.CheckpointError("/x/a.pt", "is empty")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, effcompile.CheckpointError) and str(copy) == str(error) and copy.path == "/x/a.pt"


# ------------------------------------------------------------------------------------ no code runs
def test_a_crafted_pickle_inside_a_checkpoint_runs_no_code(trained, tmp_path):
    model, optimizer, *_, path = trained
    marker = tmp_path / "pwned"
    payload = _payload(path)
    payload["extra"]["codec"] = _Evil(marker)
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    error = _refused(evil, model, optimizer, "refused")
    assert "builtins.open" in str(error) or "open" in str(error)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is live: an unsafe load runs its code
    assert marker.exists()


def test_a_bare_malicious_pickle_runs_no_code(trained, tmp_path):
    model, optimizer, *_ = trained
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil(marker)))
    _refused(evil, model, optimizer, "not a torch.save zip archive")
    assert not marker.exists()
    torch.save(_Evil(marker), tmp_path / "evil_zip.pt")  # the object alone in a torch zip archive
    _refused(tmp_path / "evil_zip.pt", model, optimizer, "refused.*GLOBAL")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ bad files
def test_missing_empty_and_truncated_files(trained, tmp_path):
    model, optimizer, *_, path = trained
    _refused(tmp_path / "missing.pt", model, optimizer, "does not exist")
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt", model, optimizer, "is empty")
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        truncated = tmp_path / f"truncated{cut}.pt"
        truncated.write_bytes(data[:cut])
        _refused(truncated, model, optimizer, "truncated or corrupt")


def test_corrupt_bytes_fail_the_checksum(trained, tmp_path):
    model, optimizer, *_, path = trained
    payload = _payload(path)
    payload["model"]["fc1.weight"][0, 0] += 1.0  # same layout, one value changed: only the checksum sees it
    _refused(_resave(payload, tmp_path / "bad.pt", seal=False), model, optimizer, "checksum mismatch")


def test_foreign_pt_files_are_refused(trained, tmp_path):
    model, optimizer, *_ = trained
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    _refused(tmp_path / "state_dict.pt", model, optimizer, "not an effcompile checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _refused(tmp_path / "list.pt", model, optimizer, "not an effcompile checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module needs code to rebuild
    _refused(tmp_path / "module.pt", model, optimizer, "refused")


def test_other_format_versions(trained, tmp_path):
    model, optimizer, *_, path = trained
    payload = _payload(path)
    payload["format_version"] = 3
    _refused(_resave(payload, tmp_path / "v3.pt"), model, optimizer, "format version 3, newer.*upgrade effcompile")
    payload["format_version"] = 0
    _refused(_resave(payload, tmp_path / "v0.pt"), model, optimizer, "format version 0")
    payload["format_version"] = "2"
    _refused(_resave(payload, tmp_path / "vs.pt"), model, optimizer, "format_version")


def test_version_1_checkpoints_still_load(trained, tmp_path):
    model, optimizer, step, batch, path = trained
    saved = _snapshot(model, optimizer)
    payload = _payload(path)
    del payload["checksum"]
    payload["format_version"] = 1
    torch.save(payload, tmp_path / "v1.pt")
    fresh_model, fresh_optimizer, *_ = _build(seed=3, steps=0)
    assert effcompile.load_checkpoint(tmp_path / "v1.pt", fresh_model, fresh_optimizer)["step"] == 2
    torch.set_rng_state(saved[2])
    _assert_same(saved, fresh_model, fresh_optimizer)
    # A version-2 file that lost its checksum is corrupt, not a version-1 file.
    payload["format_version"] = 2
    torch.save(payload, tmp_path / "v2-no-checksum.pt")
    _refused(tmp_path / "v2-no-checksum.pt", model, optimizer, "missing")


def test_differently_transformed_model_is_refused(trained):
    *_, path = trained
    other, other_optimizer, *_ = _build(passes=("decorrelation",), steps=0)
    _refused(path, other, other_optimizer, "was saved from a model transformed differently")


def test_tensors_that_do_not_fit_the_model(trained, tmp_path):
    model, optimizer, *_, path = trained
    cases = {
        "shape": lambda p: p["model"].__setitem__("fc1.weight", torch.zeros(3, 3)),
        "dtype": lambda p: p["model"].__setitem__("fc2.bias", p["model"]["fc2.bias"].double()),
        "missing": lambda p: p["model"].pop("head.bias"),
        "unexpected": lambda p: p["model"].__setitem__("ghost.weight", torch.zeros(1)),
        "is a str": lambda p: p["model"].__setitem__("fc1.bias", "oops"),
        # A pass buffer whose module adapts shapes on load: caught when committing, then rolled back.
        "nothing was loaded": lambda p: p["model"].__setitem__("fc2.weight_decorrelation.matrix", torch.zeros(1, 2, 2)),
    }
    for match, mutate in cases.items():
        payload = _payload(path)
        mutate(payload)
        _refused(_resave(payload, tmp_path / "bad.pt"), model, optimizer, match)


def test_optimizer_state_that_does_not_fit(trained, tmp_path):
    model, optimizer, *_, path = trained
    payload = _payload(path)
    key = next(iter(payload["optimizer"]["state"]))
    payload["optimizer"]["state"][key]["exp_avg"] = torch.zeros(2, 2)
    _refused(_resave(payload, tmp_path / "moment.pt"), model, optimizer, "exp_avg.*shape")
    payload = _payload(path)
    payload["optimizer"]["param_groups"][0]["params"].pop()
    _refused(_resave(payload, tmp_path / "groups.pt"), model, optimizer, "parameter group 0")
    payload = _payload(path)
    payload["optimizer"] = None
    _refused(_resave(payload, tmp_path / "none.pt"), model, optimizer, "no optimizer state")
    two_groups = torch.optim.Adam([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    _refused(path, model, two_groups, "parameter groups")


def test_bad_rng_state_is_refused(trained, tmp_path):
    model, optimizer, *_, path = trained
    payload = _payload(path)
    payload["rng"]["cpu"] = payload["rng"]["cpu"][:100]
    _refused(_resave(payload, tmp_path / "rng.pt"), model, optimizer, "RNG")


# ------------------------------------------------------------------------------------ fuzz
FUZZ_CASES = {"truncate": 100, "flip": 80, "flip_pickle": 80, "payload": 100}


def _mutate_payload(payload, rng):
    """One random structural change: delete a key, change a dtype or shape, or swap a value's type."""
    containers = []

    def walk(node, depth):
        if isinstance(node, dict) and node:
            containers.append(node)
            for value in node.values():
                walk(value, depth + 1)
        elif isinstance(node, list) and node:
            containers.append(node)
            for value in node:
                walk(value, depth + 1)

    walk(payload, 0)
    node = rng.choice(containers)
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    key = rng.choice(keys)
    value = node[key]
    action = rng.choice(["delete", "dtype", "shape", "type", "add"])
    if action == "delete":
        del node[key]
    elif action == "dtype" and torch.is_tensor(value):
        node[key] = value.to(rng.choice([torch.float64, torch.int32, torch.float16, torch.uint8]))
    elif action == "shape" and torch.is_tensor(value):
        node[key] = torch.zeros(value.numel() + rng.randint(1, 3), dtype=value.dtype)
    elif action == "add" and isinstance(node, dict):
        node[f"extra_key_{rng.randint(0, 9)}"] = torch.zeros(rng.randint(0, 3))
    else:
        node[key] = rng.choice(["x", None, 3, 2.5, [1], {"a": 1}, torch.zeros(2)])
    return action


def test_fuzzed_checkpoints_end_in_checkpoint_error_or_a_valid_load(tmp_path, monkeypatch, record_property):
    model, optimizer, *_ = _build()
    base = tmp_path / "base.pt"
    effcompile.save_checkpoint(base, model, optimizer, extra={"step": 2, "codec": {"state": {"v": torch.ones(3)}}})
    data = base.read_bytes()
    with zipfile.ZipFile(base) as archive:  # where the pickle (structure) lies: flips there reach the unpickler
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        pickle_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        pickle_span = (pickle_start, pickle_start + info.file_size)
    reference = _payload(base)
    effcompile.load_checkpoint(base, model, optimizer)

    loads = []
    real_load = torch.load

    def guarded_load(*args, **kwargs):  # every read of the fuzz goes through the safe unpickler
        loads.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    rng = random.Random(20240518)
    outcomes = collections.Counter()
    slowest, started = 0.0, time.perf_counter()
    target = tmp_path / "fuzzed.pt"
    for kind, count in FUZZ_CASES.items():
        for case in range(count):
            label = kind
            if kind == "truncate":
                target.write_bytes(data[: rng.randrange(0, len(data))])
            elif kind in ("flip", "flip_pickle"):
                mutated = bytearray(data)
                low, high = (0, len(data)) if kind == "flip" else pickle_span
                for _ in range(rng.randint(1, 4)):
                    mutated[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
                target.write_bytes(bytes(mutated))
            else:
                payload = real_load(io.BytesIO(data), weights_only=True)
                label = f"payload:{_mutate_payload(payload, rng)}"
                seal = rng.random() < 0.7  # mostly a valid checksum, so the structural checks are reached
                label += ":sealed" if seal else ":stale-checksum"
                torch.save(ckpt._seal(payload) if seal else payload, target)
            before = _snapshot(model, optimizer)
            tick = time.perf_counter()
            try:
                effcompile.load_checkpoint(target, model, optimizer)
            except effcompile.CheckpointError as error:
                assert str(target) in str(error), error
                _assert_same(before, model, optimizer)
                outcomes[(label, "CheckpointError")] += 1
            except Exception as error:  # pragma: no cover - the failure this test exists to catch
                pytest.fail(f"{label} case {case}: {type(error).__name__}: {error}")
            else:
                # A successful load validated: the same keys, shapes and dtypes as the model had;
                # from a byte-level mutation (the checksum passed) exactly the reference tensors.
                state = model.state_dict()
                assert list(state) == list(before[0])
                for key, value in state.items():
                    assert value.dtype == before[0][key].dtype, key
                    if kind != "payload":
                        assert torch.equal(value, reference["model"][key]), key
                outcomes[(label, "loaded")] += 1
                effcompile.load_checkpoint(base, model, optimizer)  # back to the reference state
            slowest = max(slowest, time.perf_counter() - tick)
    elapsed = time.perf_counter() - started
    total = sum(outcomes.values())
    summary = {f"{label} -> {outcome}": n for (label, outcome), n in sorted(outcomes.items())}
    print(f"\nfuzz: {total} cases in {elapsed:.1f} s (slowest load {slowest:.2f} s)")
    for line, n in summary.items():
        print(f"  {line}: {n}")
    record_property("fuzz_outcomes", summary)
    assert total == sum(FUZZ_CASES.values())
    assert loads and all(flag is True for flag in loads)  # (files refused before torch reads them make no call)
    assert slowest < 10.0  # no hang
    by_kind = collections.Counter(outcome for (label, outcome), n in outcomes.items() for _ in range(n)
                                  if label == "truncate")
    assert by_kind["CheckpointError"] == FUZZ_CASES["truncate"]  # every truncation is caught


# ------------------------------------------------------------------------------------ stage runtime files
def _staged(seed=0):
    torch.manual_seed(seed)
    model = get_model("mlp", image_size=4, hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.GreedyStages(num_stages=2), example_inputs=(_batch()[0],))
    return model


def test_stage_checkpoints_are_checked_before_anything_is_loaded(tmp_path):
    from effcompile.passes.greedy_stages.runtime.launcher import load_stage_checkpoints

    trained = _staged(seed=1)
    for k in range(2):
        effcompile.save_checkpoint(tmp_path / f"stage{k}.pt", trained, extra={"stage": k, "trained": 3})
    model = _staged(seed=2)
    extras = load_stage_checkpoints(str(tmp_path), model)
    assert [extras[k]["stage"] for k in range(2)] == [0, 1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key

    fresh = _staged(seed=3)
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    data = (tmp_path / "stage1.pt").read_bytes()
    (tmp_path / "stage1.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(effcompile.CheckpointError, match="stage1.pt.*truncated"):
        load_stage_checkpoints(str(tmp_path), fresh)
    for key, value in fresh.state_dict().items():  # stage 0's valid file was not half-applied
        assert torch.equal(value, before[key]), key


def test_stage_runtime_extra_round_trips_as_plain_data(tmp_path):
    """What a stage checkpoints in ``extra`` (codec state with VQ codebooks and generator, replay
    items, losses) is plain data: it saves, loads with weights_only=True and restores exactly."""
    from effcompile.passes.greedy_stages.runtime.replay import ReplayBuffer
    from effcompile.passes.greedy_stages.runtime.transport import VQCodec
    from effcompile.passes.greedy_stages.runtime.worker import _StageWorker

    codec = VQCodec(16, 4, seed=3)
    x = torch.randn(8, 8, 2, 2)
    payload = codec.encode(x)
    codec.encode(2 * x)
    codec.attach_codebook(payload)
    buffer = ReplayBuffer(3, 2)
    buffer.put(payload, torch.arange(8), 0)
    extra = {"codec_in": _StageWorker._codec_state(None, codec, receiver=True), "replay": buffer.state_dict(),
             "losses": [2.5, 2.25], "trained": 2}
    effcompile.save_checkpoint(tmp_path / "stage1.pt", torch.nn.Linear(2, 2), extra=extra)
    loaded = effcompile.load_checkpoint(tmp_path / "stage1.pt", torch.nn.Linear(2, 2))
    restored = VQCodec(16, 4, seed=99)
    _StageWorker._load_codec_state(None, restored, loaded["codec_in"])
    replay = ReplayBuffer(3, 2)
    replay.load_state_dict(loaded["replay"])
    assert torch.equal(restored.decode(replay.items[0].payload), codec.decode(payload))
    assert torch.equal(torch.randperm(50, generator=restored.generator), torch.randperm(50, generator=codec.generator))
    assert loaded["losses"] == [2.5, 2.25] and replay.state_dict()["counters"] == buffer.state_dict()["counters"]


def test_stage_result_and_error_files_are_data_only(tmp_path):
    from effcompile.passes.greedy_stages.runtime.launcher import StageRuntimeError, _read_error_file, _read_result_file
    from effcompile.passes.greedy_stages.runtime.worker import _write_atomic

    result = {"rank": 0, "losses": [1.0, 0.5], "state": {"w": torch.ones(2)}, "replay": None,
              "timeline": {"spawn_s": float("nan")}}
    _write_atomic(str(tmp_path / "result0.pt"), result)
    loaded = _read_result_file(str(tmp_path / "result0.pt"))
    assert loaded["losses"] == [1.0, 0.5] and torch.equal(loaded["state"]["w"], torch.ones(2))
    _write_atomic(str(tmp_path / "error0.json"), {"message": "stage 0: boom", "traceback": "..."})
    assert _read_error_file(str(tmp_path / "error0.json")) == "stage 0: boom"
    assert sorted(os.listdir(tmp_path)) == ["error0.json", "result0.pt"]

    marker = tmp_path / "pwned"
    torch.save({"rank": 0, "state": _Evil(marker)}, tmp_path / "result1.pt")
    with pytest.raises(StageRuntimeError, match="result1.pt is unreadable"):
        _read_result_file(str(tmp_path / "result1.pt"))
    assert not marker.exists()
    with pytest.raises(effcompile.CheckpointError, match="not plain data"):
        _write_atomic(str(tmp_path / "result2.pt"), {"state": _Evil(marker)})
    (tmp_path / "error1.json").write_text("{not json")
    assert "error1.json is unreadable" in _read_error_file(str(tmp_path / "error1.json"))


# ------------------------------------------------------------------------------------ ONNX files
def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "tiny",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in ("x", "y")],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), os.fspath(path))
    return path


def test_inspect_onnx_names_the_bad_file(tmp_path):
    from effcompile.onnx_export import OnnxFileError

    good = _tiny_onnx(tmp_path / "good.onnx")
    assert effcompile.inspect_onnx(good) == []
    data = good.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(b"\xff\xfe not protobuf \x00\x01" * 20)
    (tmp_path / "empty.onnx").write_bytes(b"")
    torch.save({"a": torch.ones(2)}, tmp_path / "checkpoint.onnx")
    for name, match in [("truncated.onnx", "truncated|not an ONNX model|not a valid"),
                        ("garbage.onnx", "truncated|not an ONNX model|not a valid"), ("empty.onnx", "is empty"),
                        ("missing.onnx", "does not exist"), ("checkpoint.onnx", "not an ONNX model|not a valid")]:
        with pytest.raises(OnnxFileError, match=match) as info:
            effcompile.inspect_onnx(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("technique", ["decorrelation", "randomized_vjp", "greedy_stages", "sample_selection"])
def test_a_checkpoint_from_before_the_transform_loads_strictly(technique):
    """The README's promise for every pass, aux heads included: the original model's ``state_dict``
    loads into the transformed model with ``strict=True`` and restores its weights; the pass's own
    state keeps its values.  A checkpoint holding only part of a pass's new module still fails."""
    from settings import SETTINGS

    torch.manual_seed(0)
    model = get_model("mlp", image_size=4, hidden=16)
    original = {key: value.clone() for key, value in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, SETTINGS[technique].config(), example_inputs=(_batch()[0],))
    added = {key: value.clone() for key, value in model.state_dict().items() if key not in original}
    parameters = {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.load_state_dict(original, strict=True)
    state = model.state_dict()
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, msg=key)
    for key, value in added.items():
        moved = key in parameters  # the aux heads' parameters: moved above
        torch.testing.assert_close(state[key], value + 1.0 if moved else value, msg=key)  # kept by the load
    heads = sorted(key for key in added if key.startswith("greedy_stage_heads."))
    if heads:
        with pytest.raises(RuntimeError, match="Missing key"):
            model.load_state_dict({**original, heads[0]: added[heads[0]]}, strict=True)
