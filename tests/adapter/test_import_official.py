"""`surpipe import-official`: the authors' .pt -> SURAdapter folder, and refusals."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from stages.cli import main
from helpers.authors_reference import TEMPLATE_KEYS, TheirAdapter, imported_in_float64
from surpipe import SURAdapter

D, H, FF, L = 64, 8, 96, 77


def trained_looking(seed=0) -> TheirAdapter:
    torch.manual_seed(seed)
    m = TheirAdapter(D, H, FF)
    with torch.no_grad():
        m.fc.weight.normal_(0, 0.2)  # "trained": not the zero init
        m.attention.query_layer.weight.mul_(4)
        m.attention.key_layer.weight.mul_(4)
    return m.eval()


@pytest.fixture()
def official(tmp_path):
    m = trained_looking()
    f = tmp_path / "adapter_weight_0.1.pt"
    torch.save(m.state_dict(), f)
    return m, f


def test_import_matches_their_forward_at_batch_size_one(official, tmp_path, capsys):
    theirs, f = official
    out = tmp_path / "imported"
    assert main(["import-official", str(f), str(out), "--adapter-weight", "0.1"]) == 0
    assert "imported" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["token_mixing"] == "tokenwise" and cfg["adapter_weight"] == 0.1
    assert (cfg["width"], cfg["nhead"], cfg["dim_feedforward"], cfg["num_layers"]) == (D, 8, FF, 2)
    imp = json.loads((out / "import_config.json").read_text())
    assert imp["adapter_weight"] == 0.1 and len(imp["_surpipe"]["source_sha256"]) == 64
    # their real state dict: 48 keys, the 12 of the unused template layer reported, not imported
    assert len(theirs.state_dict()) == 48
    assert imp["_surpipe"]["unused_keys"] == sorted(TEMPLATE_KEYS)

    ad = SURAdapter.from_pretrained(out)
    assert len(ad.state_dict()) == 36
    ad, theirs, x = imported_in_float64(ad, theirs, (3, L, D), seed=1)  # exact import; float64 forwards
    with torch.no_grad():
        got, e, fca = ad.forward_with_aux(x)
        for b in range(3):  # their code, one prompt at a time (their training batch size)
            t_out, t_e, t_f = theirs(x[b:b + 1])
            torch.testing.assert_close(got[b:b + 1], t_out, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(e[b:b + 1], t_e, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(fca[b:b + 1], t_f, rtol=1e-6, atol=1e-7)
    # sanity: the adapter branch is not negligible in this comparison
    assert (got - 0.9 * x).abs().max() > 1e-2


def test_import_fp16_wrapped_checkpoint_and_width_check(tmp_path):
    theirs = trained_looking(1)
    sd16 = {k: v.half() for k, v in theirs.state_dict().items()}
    f = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd16}, f)
    out = tmp_path / "o"
    assert main(["import-official", str(f), str(out), "--adapter-weight", "0.2", "--width", str(D)]) == 0
    ad = SURAdapter.from_pretrained(out)
    assert ad.dtype == torch.float32 and ad.config.adapter_weight == 0.2
    for k, v in sd16.items():
        if k not in TEMPLATE_KEYS:
            assert torch.equal(ad.state_dict()[k], v.float()), k
    assert main(["import-official", str(f), str(tmp_path / "o2"), "--adapter-weight", "0.1",
                 "--width", "768"]) == 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f1 = tmp_path / "evil_torch.pt"
    torch.save({"fc.weight": Evil()}, f1)
    f2 = tmp_path / "evil_pickle.pt"
    with open(f2, "wb") as fh:
        pickle.dump({"fc.weight": Evil()}, fh)
    for f in (f1, f2):
        assert main(["import-official", str(f), str(tmp_path / "o"), "--adapter-weight", "0.1"]) == 1
        err = capsys.readouterr().err
        assert "surpipe: error" in err and "Traceback" not in err
        assert "refusing" in err and "weights_only` set to `False`" not in err
        assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_refuses_missing_and_extra_keys(official, tmp_path, capsys):
    theirs, _ = official
    sd = dict(theirs.state_dict())
    del sd["attention.value_layer.bias"]
    sd["llm_resize.weight"] = torch.zeros(D, 4)
    f = tmp_path / "bad.pt"
    torch.save(sd, f)
    assert main(["import-official", str(f), str(tmp_path / "o"), "--adapter-weight", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "missing key: attention.value_layer.bias" in err
    assert "unexpected key: llm_resize.weight" in err

    sd = dict(theirs.state_dict())
    sd["transformer_encoder.layers.2.linear1.weight"] = torch.zeros(FF, D)
    torch.save(sd, f)
    assert main(["import-official", str(f), str(tmp_path / "o"), "--adapter-weight", "0.1"]) == 1
    assert "transformer_encoder.layers.2.linear1.weight" in capsys.readouterr().err


def test_refuses_non_tensor_entries_and_non_checkpoints(official, tmp_path, capsys):
    theirs, _ = official
    sd = dict(theirs.state_dict())
    sd["step"] = 5000
    f = tmp_path / "withstep.pt"
    torch.save(sd, f)
    assert main(["import-official", str(f), str(tmp_path / "o"), "--adapter-weight", "0.1"]) == 1
    assert "'step'" in capsys.readouterr().err
    g = tmp_path / "garbage.pt"
    g.write_bytes(b"not a checkpoint at all")
    assert main(["import-official", str(g), str(tmp_path / "o"), "--adapter-weight", "0.1"]) == 1
    assert main(["import-official", str(tmp_path / "nope.pt"), str(tmp_path / "o"),
                 "--adapter-weight", "0.1"]) == 1
    assert "not found" in capsys.readouterr().err


def test_adapter_weight_required_overwrite_and_config_replay(official, tmp_path, capsys):
    _, f = official
    out = tmp_path / "o"
    assert main(["import-official", str(f), str(out)]) == 1
    assert "--adapter-weight" in capsys.readouterr().err
    assert main(["import-official", str(f), str(out), "--adapter-weight", "0.1"]) == 0
    assert main(["import-official", str(f), str(out), "--adapter-weight", "0.1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-official", str(f), str(out), "--adapter-weight", "0.3", "--overwrite"]) == 0
    assert SURAdapter.from_pretrained(out).config.adapter_weight == 0.3
    # the saved import_config.json repeats the run
    out2 = tmp_path / "o2"
    assert main(["import-official", str(f), str(out2), "--config", str(out / "import_config.json")]) == 0
    assert SURAdapter.from_pretrained(out2).config.adapter_weight == 0.3
    assert main(["import-official", str(f), str(tmp_path / "o3"), "--adapter-weight", "1.5"]) == 1
