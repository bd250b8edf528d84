"""Applying block specs, counting DReLUs, and the spec file formats (incl. hostile pickles)."""
import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from secure_inference import (BlockReLU, MultiSiteActivation, SpecError, apply_block_spec,
                              count_drelus, extract_block_spec, find_relu_sites, load_spec,
                              save_spec, spec_from_json, spec_to_json)
from secure_inference.spec import safe_unpickle


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


def test_relu6_sites_are_refused_until_converted():
    import torchvision
    model = torchvision.models.mobilenet_v2()
    site = find_relu_sites(model, SHAPE)[0]
    with pytest.raises(SpecError, match="relu6_to_relu"):
        apply_block_spec(model, {site.name: np.ones((site.channels, 2), int)}, SHAPE)


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
