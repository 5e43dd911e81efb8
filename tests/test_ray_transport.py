"""What the Ray actor path ships from decode tasks to model actors (score/ray_actors.py): uint8 pixels,
finished into the model inputs on the actor, bit-identical to the local path's float inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_curate.pipeline.core.config import load_config
from t2i_curate.pipeline.score.ray_actors import finish_inputs, split_for_transport
from t2i_curate.pipeline.score.shards import ShardScorer


def _images() -> list:
    """RGB images of odd sizes and aspect ratios (every resize and crop path), seeded."""
    rng = np.random.default_rng(0)
    sizes = [(300, 200), (640, 480), (97, 131), (224, 224), (1000, 90)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


@pytest.fixture(scope="module")
def demo_transforms():
    return ShardScorer.for_config(load_config("demo").score).transforms


def test_actor_side_finish_is_bit_identical(demo_transforms):
    head, tail = split_for_transport(demo_transforms)
    assert set(head) == set(demo_transforms)
    assert sorted(tail) == sorted(n for n in demo_transforms if n.startswith(("clip:", "watermark:"))) and tail
    imgs = _images()
    shipped = {n: torch.stack([head[n](im) for im in imgs]) if n in tail else [head[n](im) for im in imgs]
               for n in demo_transforms}
    for n in tail:
        assert shipped[n].dtype == torch.uint8 and shipped[n].shape[-1] == 3
    got = finish_inputs(shipped, tail)
    for n, t in demo_transforms.items():
        want = [t(im) for im in imgs]
        if n in tail:
            assert torch.equal(got[n], torch.stack(want)), n  # not close: equal, bit for bit
            float_bytes = sum(w.numel() * w.element_size() for w in want)
            assert shipped[n].numel() * shipped[n].element_size() * 4 == float_bytes, n
        else:  # text's and pHash's inputs are uint8 arrays already: shipped as they are
            assert all(np.array_equal(a, b) for a, b in zip(got[n], want, strict=True)), n


def test_transforms_of_other_shapes_run_whole_in_the_decode_task():
    from torchvision import transforms as tv

    odd = {"no_normalize": tv.Compose([tv.Resize(32), tv.ToTensor()]),
           "plain": lambda im: np.asarray(im),
           "normalize_first": tv.Compose([tv.ToTensor(), tv.Normalize((0.5,) * 3, (0.5,) * 3), tv.Resize(32)])}
    head, tail = split_for_transport(odd)
    assert tail == {} and head == odd


def test_grayscale_input_travels_as_one_channel():
    from torchvision import transforms as tv

    t = tv.Compose([tv.Grayscale(), tv.Resize(40), tv.CenterCrop(32), tv.ToTensor(), tv.Normalize((0.5,), (0.25,))])
    head, tail = split_for_transport({"gray": t})
    imgs = _images()
    shipped = torch.stack([head["gray"](im) for im in imgs])
    assert shipped.dtype == torch.uint8 and shipped.shape == (len(imgs), 32, 32, 1)
    assert torch.equal(finish_inputs({"gray": shipped}, tail)["gray"], torch.stack([t(im) for im in imgs]))
    with pytest.raises(TypeError, match="uint8"):
        finish_inputs({"gray": shipped.float()}, tail)


def test_nudenet_input_travels_as_uint8_and_is_finished_bit_identical():
    # the split against preprocess, whole; preprocess against NudeNet's own _read_image: tests/test_nudity.py
    from t2i_curate.filters import nudity

    pytest.importorskip("cv2")
    head, tail = split_for_transport({nudity.INPUT: nudity.preprocess})
    assert head[nudity.INPUT] is nudity.letterbox and tail[nudity.INPUT] is nudity.finish_batch
    imgs = _images()
    shipped = [head[nudity.INPUT](im) for im in imgs]
    got = finish_inputs({nudity.INPUT: shipped}, tail)[nudity.INPUT]
    for (small, w, h), (blob, gw, gh), im in zip(shipped, got, imgs, strict=True):
        want, ww, wh = nudity.preprocess(im)
        assert small.dtype == np.uint8 and small.nbytes * 4 == want.nbytes  # 300 KB shipped, not 1.2 MB
        assert (w, h) == (gw, gh) == (ww, wh) == im.size
        assert blob.dtype == want.dtype and blob.flags.c_contiguous and np.array_equal(blob, want)
