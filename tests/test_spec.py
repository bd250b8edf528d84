"""Applying block specs, counting DReLUs, and the spec file formats (incl. hostile pickles)."""
import copy
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from secure_inference import (BlockReLU, MultiSiteActivation, SpecError, apply_block_spec,
                              count_drelus, extract_block_spec, find_relu_sites, load_spec,
                              save_spec, spec_from_json, spec_to_json)
from secure_inference.spec import (MAX_SPEC_CHANNELS, MAX_SPEC_FILE_BYTES, MAX_SPEC_TOTAL_CHANNELS,
                                   safe_unpickle)
from helpers.reference_models import randomize_bn


def resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10).eval()


SHAPE = (3, 32, 32)


def test_replaces_exactly_one_of_two_sites_sharing_a_module():
    model = resnet18()
    x = torch.randn(2, *SHAPE)
    clean = model(x)
    sites = {s.name: s for s in find_relu_sites(model, SHAPE)}
    spec = {"layer1.0.relu#1": np.tile([[2, 2]], (sites["layer1.0.relu#1"].channels, 1))}
    apply_block_spec(model, spec, SHAPE)
    shared = model.layer1[0].relu
    assert isinstance(shared, MultiSiteActivation)
    assert isinstance(shared.sites[0], nn.ReLU) and isinstance(shared.sites[1], BlockReLU)
    assert isinstance(model.layer1[1].relu, nn.ReLU)
    # same sites, same names after replacement
    assert [s.name for s in find_relu_sites(model, SHAPE)] == list(sites)
    got = model(x)
    assert not torch.allclose(got, clean)
    # independent reference: the same network written out with the second call replaced
    ref = resnet18()
    ref.load_state_dict(model.state_dict())
    block = ref.layer1[0]
    brelu = BlockReLU(spec["layer1.0.relu#1"])

    def forward(x, b=block):
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.bn2(b.conv2(out))
        return brelu(out + x)

    block.forward = forward
    torch.testing.assert_close(got, ref(x))


def test_state_dict_keys_unchanged_and_spec_round_trips():
    model = resnet18()
    keys = set(model.state_dict())
    rng = np.random.default_rng(0)
    spec = {s.name: rng.integers(0, 4, size=(s.channels, 2)).astype(np.int32)
            for s in find_relu_sites(model, SHAPE)[::3]}
    apply_block_spec(model, spec, SHAPE)
    assert set(model.state_dict()) == keys
    got = extract_block_spec(model, SHAPE)
    assert set(got) == set(spec)
    for k in spec:
        np.testing.assert_array_equal(got[k], spec[k])


def test_deepcopy_keeps_call_dispatch():
    model = resnet18()
    spec = {"layer2.1.relu#0": np.tile([[3, 3]], (128, 1))}
    apply_block_spec(model, spec, SHAPE)
    clone = copy.deepcopy(model)
    x = torch.randn(1, *SHAPE)
    torch.testing.assert_close(clone(x), model(x))
    torch.testing.assert_close(clone(x), model(x))


def test_interrupted_forward_does_not_shift_later_calls():
    model = resnet18()
    apply_block_spec(model, {"layer1.0.relu#1": np.tile([[4, 4]], (64, 1))}, SHAPE)
    x = torch.randn(1, *SHAPE)
    expected = model(x)
    model.layer1[0].relu(torch.randn(1, 64, 8, 8))  # a stray call outside the block's forward
    torch.testing.assert_close(model(x), expected)


def test_count_drelus_per_site_and_total():
    model = resnet18()
    sites = find_relu_sites(model, SHAPE)
    first = sites[0]  # 64 channels at 16x16
    spec = {first.name: np.array([[2, 2]] * 32 + [[0, 1]] * 16 + [[1, 1]] * 16)}
    counts = count_drelus(spec, sites)
    assert counts[first.name] == 32 * 64 + 0 + 16 * 256
    assert counts["total"] == sum(s.num_relus for s in sites[1:]) + counts[first.name]


@pytest.mark.parametrize("spec,msg", [
    ({"layer9.relu": np.ones((64, 2), int)}, "does not have"),
    ({"layer1.0.relu": np.ones((64, 2), int)}, "sites of that module"),
    ({"relu": np.ones((63, 2), int)}, "'relu' .*64 channels.*63 rows"),
    ({"relu": np.ones((64, 3), int)}, r"'relu'.*\[C, 2\]"),
    ({"relu": np.full((64, 2), 1.5)}, "'relu'.*integers"),
    ({7: np.ones((64, 2), int)}, "site names"),
])
def test_bad_specs_name_the_site_and_the_expectation(spec, msg):
    with pytest.raises(SpecError, match=msg):
        apply_block_spec(resnet18(), spec, SHAPE)


def _mobilenet_v2():
    import torchvision
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)).eval()


def test_relu6_sites_take_block_relu6_and_round_trip(tmp_path):
    """A spec names ReLU6 sites as it names ReLU sites: they become Block-ReLU6s (ReLU6 kept
    where the row is [1, 1]), keep their names, count two DReLUs per patch, and the spec
    comes back from the model and from a file unchanged."""
    from secure_inference.brelu import BlockReLU6
    model = _mobilenet_v2()
    sites = find_relu_sites(model, SHAPE)
    assert {s.activation for s in sites} == {"relu6"}
    a, b = sites[0], sites[3]
    rows = np.tile([[1, 1], [2, 2], [0, 1], [3, 5]], (a.channels // 4 + 1, 1))[:a.channels]
    spec = {a.name: rows.astype(np.int32), b.name: np.ones((b.channels, 2), np.int32)}
    x = torch.randn(2, *SHAPE)
    apply_block_spec(model, spec, SHAPE)
    assert isinstance(model.get_submodule(a.module_path), BlockReLU6)
    assert isinstance(model.get_submodule(b.module_path), BlockReLU6)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (args[0].clone(), out)
        return hook
    hooks = [model.get_submodule(s.module_path).register_forward_hook(record(s.name))
             for s in (a, b)]
    with torch.no_grad():
        got = model(x)
    for h in hooks:
        h.remove()
    (xa, ya), (xb, yb) = seen[a.name], seen[b.name]
    torch.testing.assert_close(yb, nn.functional.relu6(xb), rtol=0, atol=0)   # [1, 1]: ReLU6
    assert not torch.equal(ya, nn.functional.relu6(xa))
    torch.testing.assert_close(ya[:, 0::4], nn.functional.relu6(xa[:, 0::4]), rtol=0, atol=0)
    torch.testing.assert_close(ya[:, 2::4], xa[:, 2::4], rtol=0, atol=0)       # identity
    after = find_relu_sites(model, SHAPE)
    assert [(s.name, s.activation) for s in after] == [(s.name, "relu6") for s in sites]
    assert {s.kind for s in after} == {"ReLU6", "BlockReLU6"}
    counts = count_drelus(spec, sites)
    per_channel = {(1, 1): a.height * a.width, (2, 2): 16 * 16 // 4, (0, 1): 0,
                   (3, 5): 6 * 4}   # 16x16 map: ceil(16/3)·ceil(16/5)
    assert (a.height, a.width) == (16, 16)
    assert counts[a.name] == 2 * sum(per_channel[tuple(r)] for r in rows.tolist())
    assert counts[b.name] == 2 * b.num_relus == b.num_drelus
    assert counts[sites[1].name] == 2 * sites[1].num_relus
    back = extract_block_spec(model, SHAPE)
    assert list(back) == [a.name, b.name]
    for name in spec:
        np.testing.assert_array_equal(back[name], spec[name])
    path = tmp_path / "relu6.pickle"
    save_spec(back, path)
    again = apply_block_spec(_mobilenet_v2(), load_spec(path), SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(again(x), got, rtol=0, atol=0)


def test_relu6_spec_of_ones_keeps_relu6_and_identity_rows_pass_unclipped():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU6()).eval()
    x = torch.randn(2, *SHAPE) * 10
    with torch.no_grad():
        clean = model(x)
        kept = apply_block_spec(copy.deepcopy(model), {"1": np.ones((2, 2), int)}, SHAPE)
        torch.testing.assert_close(kept(x), clean, rtol=0, atol=0)
        ident = apply_block_spec(copy.deepcopy(model), {"1": np.array([[0, 1], [1, 1]])}, SHAPE)
        y = ident(x)
    pre = model[0](x)
    torch.testing.assert_close(y[:, 0], pre[:, 0], rtol=0, atol=0)   # no clip, no ReLU
    assert float(pre[:, 0].max()) > 6 and float(pre[:, 0].min()) < 0
    torch.testing.assert_close(y[:, 1], clean[:, 1], rtol=0, atol=0)


class _SharedReLU6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.act(self.conv(self.act(x)))


def test_one_call_of_a_shared_relu6_module():
    model = _SharedReLU6().eval()
    sites = find_relu_sites(model, SHAPE)
    assert [(s.name, s.activation) for s in sites] == [("act#0", "relu6"), ("act#1", "relu6")]
    apply_block_spec(model, {"act#1": np.full((3, 2), 4)}, SHAPE)
    from secure_inference.brelu import BlockReLU6
    assert isinstance(model.act, MultiSiteActivation)
    assert isinstance(model.act.sites[0], nn.ReLU6) and isinstance(model.act.sites[1], BlockReLU6)
    after = find_relu_sites(model, SHAPE)
    assert [(s.kind, s.activation) for s in after] == [("MultiSiteActivation", "relu6")] * 2
    assert count_drelus({"act#1": np.full((3, 2), 4)}, after) == {
        "act#0": 2 * 3 * 32 * 32, "act#1": 2 * 3 * 8 * 8, "total": 2 * 3 * (32 * 32 + 64)}


@pytest.mark.parametrize("suffix", [".pickle", ".json"])
def test_file_round_trip(tmp_path, suffix):
    spec = {"a.relu#0": np.array([[1, 1], [0, 1], [3, 2]], dtype=np.int32),
            "b:relu": np.array([[7, 7]], dtype=np.int32)}
    path = tmp_path / f"spec{suffix}"
    save_spec(spec, path)
    got = load_spec(path)
    assert list(got) == list(spec)
    for k in spec:
        assert got[k].dtype == np.int32
        np.testing.assert_array_equal(got[k], spec[k])


def test_reads_plain_pickles_of_other_writers(tmp_path):
    path = tmp_path / "other.pkl"
    spec = {"layer1": np.array([[2, 2], [1, 1]], dtype=np.int64)}
    path.write_bytes(pickle.dumps(spec, protocol=2))
    assert load_spec(path)["layer1"].tolist() == [[2, 2], [1, 1]]
    path.write_bytes(pickle.dumps(spec, protocol=5))
    assert load_spec(path)["layer1"].dtype == np.int32


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_executing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"relu": Exploit()})
    assert b"system" in payload
    with pytest.raises(SpecError, match="refusing to unpickle"):
        safe_unpickle(payload)
    (tmp_path / "evil.pickle").write_bytes(payload)
    with pytest.raises(SpecError):
        load_spec(tmp_path / "evil.pickle")
    assert not (tmp_path / "pwned").exists()


def test_object_arrays_and_odd_types_are_refused():
    with pytest.raises(SpecError, match="dtype object"):
        safe_unpickle(pickle.dumps({"a": np.array([None, 1], dtype=object)}))
    with pytest.raises(SpecError, match="refusing"):
        safe_unpickle(pickle.dumps({"a": {1, 2}} | {"b": torch.zeros(1)}))
    with pytest.raises(SpecError, match="not a valid"):
        safe_unpickle(b"\x80\x04garbage")
    assert safe_unpickle(pickle.dumps({"a": [1, "x", 2.5]})) == {"a": [1, "x", 2.5]}


def test_json_errors_and_text():
    text = spec_to_json({"x": np.array([[2, 3]])})
    assert '"x"' in text and spec_from_json(text)["x"].tolist() == [[2, 3]]
    with pytest.raises(SpecError, match="malformed"):
        spec_from_json("{not json")
    with pytest.raises(SpecError, match="dict"):
        spec_from_json("[1, 2]")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="block spec file not found"):
        load_spec(tmp_path / "nope.pickle")


# --------------------------------------------------------------------------- hostile spec files
# (issue 13 items 3, 4 and 7): sizes are checked from the pickle's header before any memory of
# the announced size is spent, values beyond int32 are refused instead of wrapping, and
# malformed JSON is a SpecError that says what is wrong.

HUGE = (2**27, 2)  # 2**27 int32 rows: 1 GiB if it were allocated


class _Reduce:
    """Pickles as ``func(*args)`` (plus ``state`` for BUILD): a hand-made pickle payload."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _hostile_arrays():
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
    i4 = np.dtype("int32")
    return {
        "ndarray(shape, dtype)": _Reduce(np.ndarray, (HUGE, i4)),
        "_reconstruct + state": _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                        (1, HUGE, i4, False, b"\0" * 16)),
        "_frombuffer": _Reduce(_frombuffer, (b"\0" * 16, i4, HUGE, "C")),
    }


def _peak_bytes(fn):
    """(result or exception, tracemalloc peak) of ``fn()``."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - returned for the caller to check
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", list(_hostile_arrays()))
def test_huge_announced_array_is_refused_before_allocation(kind, tmp_path):
    payload = pickle.dumps({"relu": _hostile_arrays()[kind]}, protocol=4)
    assert len(payload) < 250
    err, peak = _peak_bytes(lambda: safe_unpickle(payload))
    assert isinstance(err, SpecError), err
    assert "site 'relu'" in str(err) and str(MAX_SPEC_CHANNELS) in str(err)
    assert peak < 4 * 2**20  # vs 1 GiB announced
    path = tmp_path / "small.pickle"
    path.write_bytes(payload)
    err, peak = _peak_bytes(lambda: load_spec(path))
    assert isinstance(err, SpecError) and "site 'relu'" in str(err), err
    assert peak < 4 * 2**20


def test_memo_index_cannot_size_the_unpickler():
    # LONG_BINPUT 2**26: the C unpickler would grow (and zero) a 1 GiB memo table for it
    payload = b"\x80\x04N" + b"r" + (2**26).to_bytes(4, "little") + b"."
    err, peak = _peak_bytes(lambda: safe_unpickle(payload))
    assert isinstance(err, SpecError) and "memo index" in str(err), err
    assert peak < 4 * 2**20


def test_all_sites_together_are_capped_even_when_one_array_is_reused():
    rows = np.ones((MAX_SPEC_CHANNELS, 2), dtype=np.int8)  # pickled once, referenced 3 times
    payload = pickle.dumps({"a": rows, "b": rows, "c": rows}, protocol=4)
    assert len(payload) < 3 * 2**20
    with pytest.raises(SpecError, match=f"site 'c'.*{MAX_SPEC_TOTAL_CHANNELS}"):
        safe_unpickle(payload)


@pytest.mark.parametrize("array,msg", [
    (np.ones((4, 2), dtype=np.float32), "site 'relu'.*dtype float32"),
    (np.ones((4, 2), dtype=bool), "site 'relu'.*dtype bool"),
    (np.ones((4, 3), dtype=np.int32), r"site 'relu'.*\(4, 3\) is not \[C, 2\]"),
    (np.ones((4, 2, 1), dtype=np.int32), r"site 'relu'.*\(4, 2, 1\)"),
    (np.ones(8, dtype=np.int32), r"site 'relu'.*\(8,\)"),
])
def test_spec_arrays_must_be_integer_rows_of_two(array, msg):
    with pytest.raises(SpecError, match=msg):
        safe_unpickle(pickle.dumps({"relu": array}))


def test_oversized_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.pickle"
    with path.open("wb") as f:
        f.truncate(MAX_SPEC_FILE_BYTES + 1)  # sparse: no disk, no memory
    err, peak = _peak_bytes(lambda: load_spec(path))
    assert isinstance(err, SpecError) and "MAX_SPEC_FILE_BYTES" in str(err), err
    assert peak < 2**20


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_integer_arrays_of_every_layout_still_load(tmp_path, protocol):
    base = np.array([[2, 3], [0, 1], [7, 1], [1, 1]])
    spec = {"le8": base.astype(np.int8), "be4": base.astype(">i4"), "u2": base.astype(np.uint16),
            "fortran": np.asfortranarray(base.astype(np.int64)), "empty": np.zeros((0, 2), int)}
    path = tmp_path / "spec.pickle"
    path.write_bytes(pickle.dumps(spec, protocol=protocol))
    got = load_spec(path)
    assert list(got) == list(spec)
    for name in ("le8", "be4", "u2", "fortran"):
        assert got[name].dtype == np.int32 and got[name].tolist() == base.tolist()
    assert got["empty"].shape == (0, 2)


WRAPPING = [  # each once wrapped to int32 silently (issue 13 item 4)
    (np.array([[4294967298, 2]], dtype=np.int64), "4294967298"),
    (np.array([[2**63, 2**63]], dtype=np.uint64), str(2**63)),
    (np.array([[3, 2**31]], dtype=np.int64), str(2**31)),
    (np.array([[-1, 1]], dtype=np.int64), "-1"),
]


@pytest.mark.parametrize("array,value", WRAPPING)
def test_block_sizes_beyond_int32_are_refused_in_pickles(tmp_path, array, value):
    path = tmp_path / "spec.pickle"
    path.write_bytes(pickle.dumps({"relu": np.concatenate([[[1, 1]], array]).astype(array.dtype)}))
    with pytest.raises(SpecError, match=f"site 'relu'.*channel 1 has block size {value}"):
        load_spec(path)


@pytest.mark.parametrize("value", ["4294967298", "1e10", "9223372036854775808", "1e400", "-1",
                                   "2.5", "true", '"2"'])
def test_block_sizes_beyond_int32_are_refused_in_json(value):
    text = '{"relu": [[1, 1], [2, %s]]}' % value
    with pytest.raises(SpecError, match="site 'relu'.*channel 1 has block size"):
        spec_from_json(text)


@pytest.mark.parametrize("values,shown", [
    (np.full((64, 2), 4294967298, dtype=np.int64), "4294967298"),
    (np.full((64, 2), 1e10), "10000000000.0"),
    (np.full((64, 2), 2**63, dtype=np.uint64), str(2**63)),
    (np.full((64, 2), np.inf), "inf"),
    (torch.full((64, 2), 2**40, dtype=torch.int64), str(2**40)),
])
def test_block_sizes_beyond_int32_are_refused_in_users_arrays(tmp_path, values, shown):
    with pytest.raises(SpecError, match=f"site 'relu'.*channel 0 has block size {shown}"):
        apply_block_spec(resnet18(), {"relu": values}, SHAPE)
    with pytest.raises(SpecError, match=f"site 'relu'.*channel 0 has block size {shown}"):
        save_spec({"relu": values}, tmp_path / "spec.pickle")
    assert not (tmp_path / "spec.pickle").exists()


@pytest.mark.parametrize("text,msg", [
    ('{"x": [[1, 2], [3]]}', r"site 'x': channel 1: expected a row \[h, w\].*got \[3\]"),
    ('{"x": [[1, 2], [3, 4, 5]]}', r"site 'x': channel 1: expected a row"),
    ('{"x": [[1, 2], 3]}', r"site 'x': channel 1: expected a row.*got 3"),
    ('{"x": [[[1], [2]]]}', r"site 'x': channel 0 has block size list"),
    ('{"x": 5}', r"site 'x': expected a list of \[h, w\] rows"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"x": [[1, ' + "9" * 5000 + ']]}', "cannot be read"),
])
def test_ragged_and_deep_json_is_a_spec_error(text, msg):
    with pytest.raises(SpecError, match=msg):
        spec_from_json(text)


def test_json_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "spec.json"
    path.write_bytes(b'{"x": [[1, 1]]}\xff')
    with pytest.raises(SpecError, match="UTF-8"):
        load_spec(path)
