"""Adapter state: Flower wire format, PEFT export and key checks."""

import os

import pytest
import torch
from peft import PeftModel

from copra_core.adapters import (
    AdapterMismatchError,
    check_compatible,
    export_adapter,
    from_array_record,
    get_adapter_state,
    set_adapter_state,
    to_array_record,
)


def _trained(bundle, seed=0):
    state = get_adapter_state(bundle.model)
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def test_array_record_round_trip_is_exact(bundle):
    state = _trained(bundle)
    back = from_array_record(to_array_record(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_fp16_transport_is_close_and_half_the_bytes(bundle):
    from copra_core.adapters import array_record_nbytes

    state = _trained(bundle)
    rec32, rec16 = to_array_record(state, "float32"), to_array_record(state, "float16")
    # Wire bytes include a small header per array, so the ratio is just above one half.
    assert 0.5 < array_record_nbytes(rec16) / array_record_nbytes(rec32) < 0.51
    back = from_array_record(rec16)
    assert all(torch.allclose(back[k], state[k], rtol=1e-3, atol=1e-3) for k in state)


def test_peft_export_reloads_with_same_logits(bundle, tmp_path):
    state = _trained(bundle, seed=3)
    out = export_adapter(bundle.model, state, tmp_path / "adapter")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or {
        "adapter_config.json",
        "adapter_model.safetensors",
    } <= set(os.listdir(out))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp folders left

    batch = next(bundle.task.eval_batches(bundle.task.server_examples(16), 16))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    set_adapter_state(bundle.model, state)
    bundle.model.eval()
    with torch.no_grad():
        expected = bundle.model(**inputs).logits
    base, _ = bundle.task.load_model()  # a fresh base: new random head, overwritten by the adapter
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_export_replaces_existing_adapter_atomically(bundle, tmp_path):
    first = export_adapter(bundle.model, _trained(bundle, 1), tmp_path / "adapter")
    before = (first / "adapter_model.safetensors").read_bytes()
    export_adapter(bundle.model, _trained(bundle, 2), tmp_path / "adapter")
    assert (first / "adapter_model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_check_compatible_names_the_problem(bundle):
    reference = get_adapter_state(bundle.model)
    key = next(iter(reference))
    renamed = {("x." + k if k == key else k): v for k, v in reference.items()}
    with pytest.raises(AdapterMismatchError, match="missing keys") as info:
        check_compatible(renamed, reference, source="adapter from client node 7")
    assert "client node 7" in str(info.value) and "unexpected keys" in str(info.value)
    reshaped = dict(reference)
    reshaped[key] = torch.zeros(3, 3)
    with pytest.raises(AdapterMismatchError, match="shape mismatches"):
        check_compatible(reshaped, reference, source="adapter")


def test_written_files_get_the_umask_permissions_not_private_ones(bundle, tmp_path):
    """A Docker volume's checkpoint and adapter must be readable by the host's other users:
    the atomic writes give what a plain open/mkdir gives (0o644 / 0o755 under umask 022),
    not mkstemp's 0o600 or mkdtemp's 0o700."""
    from copra_core.base_offset import save_offsets
    from copra_core.checkpoint import Checkpoint, save_checkpoint

    old_umask = os.umask(0o022)
    try:
        state = bundle.initial_state()
        adapter = export_adapter(bundle.model, state, tmp_path / "adapter")
        checkpoint = save_checkpoint(tmp_path, Checkpoint(1, {"seed": 0}, {"global": state}))
        offsets = save_offsets({"m.base_offset": torch.zeros(2, 2)}, tmp_path / "base_offset.safetensors")
    finally:
        os.umask(old_umask)
    assert oct(adapter.stat().st_mode & 0o777) == oct(0o755)
    for path in (adapter / "adapter_model.safetensors", checkpoint, offsets):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
