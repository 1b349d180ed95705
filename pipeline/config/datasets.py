"""The dataset registry: every fact about a dataset that code outside its reader needs, in one place.

Readers (pipeline/data), model configs, the defense builder, job validation and the exports ask
here for a dataset's image shape, classes and splits instead of writing them down again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import DatasetError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int  # images are size x size
    classes: int
    splits: tuple[str, ...] = ("train", "test")
    needs_root: bool = True  # False: embedded in the package, no data_root
    label: str = ""  # how exports name it
    class_names: tuple[str, ...] = ()  # label -> name, where the dataset names its classes

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.size, self.size)


# The names of the releases' batches.meta (label_names) and meta (fine_label_names), in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm""".split())

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("digits", channels=1, size=8, classes=10, needs_root=False, label="digits (8x8)"),
    DatasetInfo("cifar10", channels=3, size=32, classes=10, label="CIFAR-10", class_names=CIFAR10_CLASSES),
    DatasetInfo("cifar100", channels=3, size=32, classes=100, label="CIFAR-100", class_names=CIFAR100_CLASSES),
)}

# The names as a type for the pydantic specs; kept equal to DATASETS (tests/test_data.py checks).
DatasetName = Literal["digits", "cifar10", "cifar100"]


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`; DatasetError naming the known datasets otherwise."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(repr(n) for n in DATASETS)}")
    return DATASETS[name]
