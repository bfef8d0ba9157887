"""A model's card: what a network's inputs and outputs mean and how it was made, kept apart from
the network.

The network (:mod:`.models`) is an architecture and its weights, nothing else: its source has no
other import than torch, so it can travel as the architecture of an exported model. The card
says what the rest of the package needs to use it:

- ``normalization``: how raw pixels become network input (:class:`~.normalize.Normalization`);
- ``encoding``: what the output classes mean and how they become objects (:mod:`.encodings`);
- ``postprocess``: the decoding settings that suit these weights (threshold, seeds, min size);
- ``provenance``: how the weights were made (training runs, notes, the uncertainty reference).

A model is a network with its card attached (``network.card``); :func:`card_of` gives a bare
network the default card for its number of classes. Model files store the network's config and
the card's entries side by side in one JSON config (:mod:`.checkpoint`); :func:`build_model`
builds both from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from . import encodings
from .normalize import Normalization

#: Config entries that belong to the card (the rest describe the network).
CARD_KEYS = ("normalization", "encoding", "postprocess", "provenance")


@dataclass
class ModelCard:
    """What a network's numbers mean and where they come from (see the module docstring).

    Parameters
    ----------
    encoding
        Meaning of the output classes: ``"foreground"`` (2 classes), ``"boundary"`` (3 classes)
        or ``"semantic"`` (:mod:`.encodings`).
    normalization
        Input normalisation used by :func:`~napari_unet_studio.predict` and training.
    postprocess
        Keyword arguments of :func:`~napari_unet_studio.postprocess.labels_from_probabilities`
        (``threshold``, ``min_size``, ...) that suit these weights; :func:`~napari_unet_studio.segment`
        uses them unless told otherwise.
    provenance
        Free-form record of how the weights were made (training runs, notes), saved with the model.
    """

    encoding: str = "foreground"
    normalization: Normalization = field(default_factory=Normalization)
    postprocess: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        encodings.get(self.encoding)  # a clear error for an unknown name
        if not isinstance(self.normalization, Normalization):
            self.normalization = Normalization.from_dict(self.normalization)
        self.postprocess = dict(self.postprocess or {})
        self.provenance = dict(self.provenance or {})

    @classmethod
    def for_classes(cls, n_classes: int, **entries) -> ModelCard:
        """The card of a network with ``n_classes`` outputs: ``entries`` (any of
        :data:`CARD_KEYS`), the encoding by default the one for that many classes."""
        entries = {k: v for k, v in entries.items() if v is not None}
        entries.setdefault("encoding", encodings.for_classes(n_classes))
        card = cls(**entries)
        card.check(n_classes)
        return card

    def check(self, n_classes: int) -> None:
        """Raise ``ValueError`` (an :class:`~.errors.InputError` for bad settings) when the card does
        not fit a network with ``n_classes`` outputs or its post-processing settings are wrong."""
        from .postprocess import check_options

        encodings.check_classes(self.encoding, n_classes)
        check_options(self.encoding, self.postprocess)

    def to_dict(self) -> dict:
        """The JSON-serialisable entries stored in a model's config."""
        return {
            "normalization": self.normalization.to_dict(),
            "encoding": self.encoding,
            "postprocess": copy.deepcopy(self.postprocess),
            "provenance": copy.deepcopy(self.provenance),
        }


def card_of(network) -> ModelCard:
    """The card attached to ``network``. A network built without one (``UNet()``) gets, and keeps,
    the default card for its number of classes, so changes to the card stay with the network."""
    card = getattr(network, "card", None)
    if card is None:
        card = ModelCard.for_classes(network.n_classes)
        network.card = card
    return card


def attach(network, card: ModelCard):
    """``network`` with ``card`` attached (checked against its classes); returns ``network``."""
    card.check(network.n_classes)
    network.card = card
    return network


def split_config(config: dict) -> tuple[dict, dict]:
    """A model config split into the network's entries and the card's (:data:`CARD_KEYS`)."""
    network = {k: v for k, v in config.items() if k not in CARD_KEYS}
    card = {k: config[k] for k in CARD_KEYS if config.get(k) is not None}
    return network, card


def model_config(network) -> dict:
    """The whole JSON config of a model: the network's entries and its card's."""
    return {**network.config(), **card_of(network).to_dict()}


def build_model(config: dict):
    """An untrained network with its card, from a model config (:func:`model_config`; the card's
    entries are optional)."""
    from .models import build_network

    network_config, card_entries = split_config(config)
    network = build_network(network_config)
    return attach(network, ModelCard.for_classes(network.n_classes, **card_entries))
