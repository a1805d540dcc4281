"""Continuous batching: a fixed number of slots, refilled as requests end (``generate_batch``, a
streaming ``ServingManager``), over any ``SlotBackend`` (see ``slots``); documents prefilled once
and asked many questions (``PrefixStore``)."""
from shadowkv_fx.serving.batch import generate_batch
from shadowkv_fx.serving.dense_slots import DenseSlots
from shadowkv_fx.serving.manager import ServingManager
from shadowkv_fx.serving.prefix_store import PrefixStore
from shadowkv_fx.serving.requests import CANCELLED, GenerationOutput, RequestStatus, TokenEvent
from shadowkv_fx.serving.scheduler import SlotScheduler
from shadowkv_fx.serving.shadowkv_slots import ShadowKVSlots
from shadowkv_fx.serving.slots import SlotBackend, slots_for

__all__ = ["CANCELLED", "DenseSlots", "GenerationOutput", "PrefixStore", "RequestStatus", "ServingManager",
           "ShadowKVSlots", "SlotBackend", "SlotScheduler", "TokenEvent", "generate_batch", "slots_for"]
