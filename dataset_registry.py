"""Every data source by its config name (`dataset.name`): DATASETS maps it to its loader, `build_dataset`
calls it. The loaders live with their data: datasets.py (moons, digits, MNIST, Fashion-MNIST, CIFAR-10),
image_folder.py (folders of images) and latent_cache.py (the ImageNet latent cache); the registry sits
above them; datasets.DATASET_INFO has each name's shape and class count.
"""

from datasets import InMemoryDataset, load_cifar10, load_digits, load_fashion_mnist, load_mnist, load_moons
from image_folder import ImageFolderDataset, load_imagefolder
from latent_cache import LatentCacheDataset, load_latent_cache

DATASETS = {
    "moons": load_moons,
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
    "latent_cache": load_latent_cache,
}


def build_dataset(name: str, device, **kwargs) -> InMemoryDataset | ImageFolderDataset | LatentCacheDataset:
    return DATASETS[name](device=device, **kwargs)
