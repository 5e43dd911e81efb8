"""FID protocols against the reference libraries themselves (torch-fidelity, clean-fid), on the same
non-square images and the same (random, seeded) Inception weights; CLIP score aggregates.

The FID tests are slow on CPU: the square root of the 2048x2048 covariance product (torchmetrics' eigvals,
scipy's sqrtm in the references) takes ~20 s each on 2 cores, whatever N is."""

import math
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_curate.eval.fid import ProtocolMismatchError, check_comparable, feature_spec, fid_kid, protocol
from t2i_curate.eval.stats import clip_score, clip_score_torchmetrics
from t2i_curate.pipeline.core.config import EvalConfig

N = 20
SIZES = [(256, 384), (300, 200)]  # (width, height): portrait and landscape, neither square nor 299


def _write_set(folder, seed: int, shift: int) -> None:
    """Smooth random colour fields with grain, two sizes mixed; ``shift`` moves the colour distribution."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(N):
        w, h = SIZES[i % 2]
        low = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        period = rng.uniform(2.2, 3.5)  # fine stripes: resized with or without antialiasing, they differ
        stripes = 50 * np.sin(2 * np.pi * np.arange(w) / period)[None, :, None]
        arr = np.asarray(low).astype(int) + stripes + rng.integers(-25, 26, (h, w, 3)) + shift
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def _reference_net(weights):
    """torch-fidelity's own Inception class, loaded from ``weights`` (the reference side's network)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


class CleanFidInception(torch.nn.Module):
    """clean-fid's ``InceptionV3W(resize_inside=False)`` path, ``(x - 128) / 128`` then the network to pool3,
    with torch-fidelity's network and weights in place of clean-fid's TorchScript file (not offline)."""

    def __init__(self, weights):
        super().__init__()
        self.net = _reference_net(weights)

    @torch.no_grad()
    def forward(self, x):
        assert x.shape[2] == 299 and x.shape[3] == 299
        n = self.net
        x = (x.float() - 128) / 128
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.MaxPool_1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.MaxPool_2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.AvgPool):
            x = layer(x)
        return torch.flatten(x, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random seeded Inception weights saved to a file, and two folders of non-square PNGs."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    root = tmp_path_factory.mktemp("fidproto")
    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # random init, nothing loaded
    for m in net.modules():  # PyTorch's default init shrinks activations to denormals (slow, FID ~1e-13)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    weights = root / "random-inception.pth"
    torch.save(net.state_dict(), weights)
    _write_set(root / "gen", 1, 40)
    _write_set(root / "ref", 2, 0)
    return {"root": root, "weights": weights, "gen": root / "gen", "ref": root / "ref", "ours": {}}


def _ours(data, proto: str) -> float:
    if proto not in data["ours"]:
        ecfg = EvalConfig(reference=str(data["ref"]), inception_weights=str(data["weights"]), fid_protocol=proto)
        gen = sorted(data["gen"].glob("*.png"))
        res = fid_kid(ecfg, None, False, data["root"], gen, data["root"] / f"cache-{proto}")
        assert res["protocol"]["protocol"] == proto and res["protocol"]["n_reference"] == N
        data["ours"][proto] = res["fid"]
    return data["ours"][proto]


def _torch_fidelity_fid(weights, gen, ref) -> float:
    import torch_fidelity

    m = torch_fidelity.calculate_metrics(input1=str(gen), input2=str(ref), fid=True, cuda=False, batch_size=1,
                                         feature_extractor_weights_path=str(weights), cache=False, verbose=False)
    return float(m["frechet_inception_distance"])


@pytest.mark.slow  # each FID on 2048 features: a 2048x2048 matrix square root, ~20 s on 2 CPUs
def test_torch_fidelity_protocol_matches_torch_fidelity(data):
    ours = _ours(data, "torch-fidelity")
    ref = _torch_fidelity_fid(data["weights"], data["gen"], data["ref"])
    print(f"torch-fidelity protocol: ours {ours:.4f}, torch-fidelity {ref:.4f}, rel {abs(ours - ref) / ref:.2e}")
    assert ours == pytest.approx(ref, rel=1e-3)


@pytest.mark.slow  # each FID on 2048 features: a 2048x2048 matrix square root, ~20 s on 2 CPUs
def test_clean_protocol_matches_clean_fid(data):
    from cleanfid import fid as cleanfid

    # the stand-in for clean-fid's network is torch-fidelity's network: equal where its own resize is a no-op
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    wrapped, own = CleanFidInception(data["weights"]), _reference_net(data["weights"])
    assert torch.allclose(wrapped(x), own(x)[0], rtol=1e-4, atol=1e-5)
    ours = _ours(data, "clean")
    ref = cleanfid.compute_fid(str(data["gen"]), str(data["ref"]), mode="clean", custom_feat_extractor=wrapped,
                               device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    print(f"clean protocol: ours {ours:.4f}, clean-fid {ref:.4f}, rel {abs(ours - ref) / ref:.2e}")
    assert ours == pytest.approx(ref, rel=1e-3)


@pytest.mark.slow  # each FID on 2048 features: a 2048x2048 matrix square root, ~20 s on 2 CPUs
def test_legacy_crop_is_torch_fidelity_on_centre_crops(data):
    """legacy-crop reproduces the old numbers: centre square crop, PIL bicubic 299, uint8, then the network."""
    crops = {}
    for side in ("gen", "ref"):
        crops[side] = data["root"] / f"crop-{side}"
        crops[side].mkdir(exist_ok=True)
        for p in sorted(data[side].glob("*.png")):
            im = Image.open(p).convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im.crop((left, top, left + s, top + s)).resize((299, 299), Image.BICUBIC).save(crops[side] / p.name)
    ours = _ours(data, "legacy-crop")
    ref = _torch_fidelity_fid(data["weights"], crops["gen"], crops["ref"])
    print(f"legacy-crop protocol: ours {ours:.4f}, torch-fidelity on crops {ref:.4f}, rel {abs(ours - ref) / ref:.2e}")
    assert ours == pytest.approx(ref, rel=1e-3)


@pytest.mark.slow  # each FID on 2048 features: a 2048x2048 matrix square root, ~20 s on 2 CPUs
def test_protocols_differ_on_non_square_images(data):
    fids = {p: _ours(data, p) for p in ("torch-fidelity", "clean", "legacy-crop")}
    print("FID per protocol:", {p: round(v, 4) for p, v in fids.items()})
    vals = list(fids.values())
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(vals[i] - vals[j]) > 0.01 * max(vals[i], vals[j]), fids


def test_compare_refuses_across_protocols(tmp_path):
    w = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(2)}, w)  # any plain-tensor file: the label says which weights ran
    specs = {p: feature_spec(EvalConfig(inception_weights=str(w), fid_protocol=p), tiny=False)
             for p in ("torch-fidelity", "clean", "legacy-crop")}
    protos = {p: protocol(s, 10, 10) for p, s in specs.items()}
    check_comparable(protos["clean"], {**protos["clean"], "n_generated": 99})
    with pytest.raises(ProtocolMismatchError, match="protocol"):
        check_comparable(protos["torch-fidelity"], protos["clean"])
    with pytest.raises(ProtocolMismatchError, match="protocol"):
        check_comparable(protos["legacy-crop"], protos["torch-fidelity"])
    old = {k: v for k, v in protos["legacy-crop"].items() if k != "protocol"}  # a score from before protocols
    with pytest.raises(ProtocolMismatchError):
        check_comparable(old, protos["legacy-crop"])
    # CLIP features: the protocol is named too
    clip = feature_spec(EvalConfig(fid_protocol="clean"), tiny=True)
    assert clip["protocol"] == "clean" and "CLIP" in clip["network_resize"]


def test_fid_antialias_is_retired():
    assert EvalConfig(fid_antialias=False).fid_protocol == "torch-fidelity"
    with pytest.raises(ValueError, match="fid_protocol"):
        EvalConfig(fid_antialias=True)


def test_clip_score_paper_and_torchmetrics_aggregates():
    cos = [0.3, -0.1]
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cos])
    assert float(clip_score(img, txt).mean()) == pytest.approx(15.0)  # per-image clamp, then mean (paper)
    assert clip_score_torchmetrics(cos) == pytest.approx(10.0)  # mean, then clamp (torchmetrics)
    assert clip_score_torchmetrics([-0.2, -0.1]) == 0.0


def test_inception_weights_are_labelled_by_content_and_pickles_refused(tmp_path):
    from t2i_curate.pipeline.core.errors import UserError

    w = tmp_path / "weights-inception-2015-12-05-6726825d.pth"  # the release's name, other content
    torch.save({"x": torch.zeros(2)}, w)
    label = feature_spec(EvalConfig(inception_weights=str(w)), tiny=False)["feature"]
    assert "not the torch-fidelity release" in label and "sha256" in label
    evil = tmp_path / "evil.pth"
    torch.save({"f": print}, evil)  # a pickle that needs more than tensors to load
    with pytest.raises(UserError, match="plain tensors"):
        feature_spec(EvalConfig(inception_weights=str(evil)), tiny=False)
