"""smoke_data: the stand-in data (random PNGs, a tiny SD-VAE, a latent cache built from them) is read
back by the real readers: the latent-cache dataset, the image-folder dataset and the VAE decoder."""

import torch

import dataset_registry
import latent_cache
import smoke_data
from conftest import load_script

build = load_script("build_latent_cache")


def test_smoke_cache_in_one_call(tmp_path):
    import vae

    made = smoke_data.make_smoke_cache(tmp_path / "smoke", num_classes=3, images_per_class=2, image_size=32)
    assert made["split"] == "train" and (tmp_path / "smoke" / "vae" / "config.json").is_file()
    data = dataset_registry.build_dataset(
        "latent_cache", "cpu", path=str(made["path"]), split=made["split"], vae=made["vae"], flip=True, verify=True
    )
    assert len(data) == 6 and data.sample_shape == (4, 4, 4) and data.class_names == ("class_0", "class_1", "class_2")
    x, y = data.batch(torch.arange(6), torch.Generator().manual_seed(0))
    images = vae.SDVAE(data.vae_id).decode(x)  # the trainer's route from latents to a figure
    assert images.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]
    folder = dataset_registry.build_dataset("imagefolder", "cpu", root=str(made["images"]), image_size=32)
    assert len(folder) == 6 and folder.num_classes == 3
    # The CLI the *_smoke presets name; rerunning into the same directory starts over.
    assert build.main(["smoke", f"out={tmp_path / 'smoke'}", "images_per_class=3", "image_size=16"]) == 0
    again = latent_cache.load_latent_cache(path=str(made["path"]), vae=made["vae"])
    assert len(again) == 6 and again.sample_shape == (4, 2, 2) and again.num_classes == 2
