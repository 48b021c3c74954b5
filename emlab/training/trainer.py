"""``EMTrainer``: trl's ``SFTTrainer`` with the emlab loss terms, overriding ``compute_loss`` only.

Per micro-batch the trainer gathers tensors and sums the pure terms of :mod:`emlab.training.losses`:

    loss = CE + kl_lambda * KL(ref, cur) + ldifs_lambda * ||x - x_ref||^2

The reference is the same model with its adapter switched off (PEFT ``disable_adapter()``; for the
learned steering vector, a pass without its hook), so no second copy is held, except for
``adapter="full"`` with ``reference_copy=True``. Preventive steering wraps the training forward
passes (the reference pass too, so KL / LDIFS measure only what the adapter changes) and never
evaluation. Each term is logged on its own (``loss/ce``, ``loss/kl``, ``loss/ldifs``).

>>> trainer = EMTrainer(model, args=EMConfig(output_dir="runs/x", kl_lambda=0.1),
...                     train_dataset=ds, processing_class=tok)          # doctest: +SKIP
>>> trainer.train()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import os
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from trl import SFTTrainer

from emlab.models import get_layers, peft_wrapping, unwrap
from emlab.training.adapters import load_vectors, prepare_model, steering_vector
from emlab.training.checkpoints import saving
from emlab.training.config import EMConfig
from emlab.training.losses import (
    IGNORE_INDEX,
    head_terms,
    ldifs_flat_loss,
    ldifs_loss,
    ldifs_sink_mask,
    next_token_mask,
)
from emlab.training.progress import quiet_dataset_bars, swap_progress

__all__ = ["EMTrainer", "draw_indices", "restore_forward"]


def _frozen_copy(model):
    """A deep copy of ``model`` in eval mode with every parameter frozen (the full-finetune reference)."""
    ref = copy.deepcopy(model)
    ref.__dict__.pop("forward", None)  # never inherit a patched forward bound to the original object
    ref.requires_grad_(False)
    ref.eval()
    return ref


def draw_indices(draw: int, n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 cache: dict[int, list[int]] | None = None) -> list[int]:
    """Row indices of the ``draw``-th batch from an endless stream of seeded permutations of ``range(n)``.

    A pure function of its arguments, so a resumed run draws exactly what an uninterrupted one
    would; each rank of a distributed run gets its own slice.

    >>> sorted(draw_indices(0, 4, 4, seed=0))           # one draw of the whole set: a permutation
    [0, 1, 2, 3]
    """
    cache = {} if cache is None else cache
    start = (draw * world + rank) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch = pos // n
        if epoch not in cache:
            cache.clear()  # positions only move forward: keep one permutation
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * (epoch + 1))).tolist()
        out.append(cache[epoch][pos % n])
    return out


def _pad_cat(a: Tensor, b: Tensor, value: int) -> Tensor:
    """Concatenate two right-padded ``(rows, len)`` tensors along rows, padding to the longer length."""
    n = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, n - a.shape[1]), value=value)
    b = torch.nn.functional.pad(b.to(a.device), (0, n - b.shape[1]), value=value)
    return torch.cat([a, b])


def restore_forward(model, before) -> None:
    """Drop the instance ``forward`` of ``model``'s transformers module (trl's patch), putting ``before`` back."""
    bare = unwrap(model)
    bare.__dict__.pop("forward", None)
    if before is not None:
        bare.__dict__["forward"] = before


class _StopForward(Exception):
    """Raised by a hook to end a reference forward pass early."""


class EMTrainer(SFTTrainer):
    """SFT with KL, LDIFS, preventive steering and the four adapters of :class:`EMConfig`.

    ``model`` is a plain causal LM (or a PEFT model whose adapter keeps training); the adapter named
    by ``args.adapter`` is set up here. ``kl_dataset`` (chat rows as a ``datasets.Dataset``) is the
    out-of-domain data of ``kl_on="kl_rows"``, drawn batch by batch in a seeded order that a resumed
    run reproduces.

    >>> EMTrainer(model, args=EMConfig(output_dir="runs/x"), train_dataset=ds, processing_class=tok)  # doctest: +SKIP
    """

    def __init__(self, model, args: EMConfig, train_dataset=None, eval_dataset=None, processing_class=None, *,
                 kl_dataset=None, callbacks=None, **kwargs: Any):
        if not isinstance(args, EMConfig):
            raise TypeError(f"EMTrainer needs an EMConfig, got {type(args).__name__}")
        if args.kl_lambda > 0 and args.kl_on == "kl_rows" and kl_dataset is None:
            raise ValueError("kl_on='kl_rows' needs a kl_dataset (the out-of-domain rows the KL is measured on).")
        if kl_dataset is not None and (args.kl_on != "kl_rows" or args.kl_lambda == 0):
            raise ValueError("a kl_dataset was given but the config does not use it: set kl_on='kl_rows' and "
                             "kl_lambda > 0, or drop the rows.")
        if args.assistant_only_loss and processing_class is not None and hasattr(processing_class, "chat_template"):
            from emlab.chat_templates import has_markers
            from emlab.models import ensure_chat_template

            if not has_markers(processing_class.chat_template):  # the model's own template, markers added
                ensure_chat_template(processing_class)  # (or a clear error naming the fix)
        # the instance forward trl's fused LM head wraps (nnsight's controller, accelerate's hook): put back after
        self._forward_before = unwrap(model).__dict__.get("forward")
        model, peft_config = prepare_model(model, args)
        self.ref_model = _frozen_copy(model) if (args.adapter == "full" and args.uses_reference) else None
        with peft_wrapping(), quiet_dataset_bars():
            super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, callbacks=callbacks, peft_config=peft_config,
                             **kwargs)
        swap_progress(self, print_logs=args.print_logs)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        n_layers = len(get_layers(self.model))
        self._preventive = None
        if args.preventive_vector is not None:
            self._preventive = load_vectors(args.preventive_vector, args.preventive_layer)
            bad = [layer for layer in self._preventive if not 0 <= layer < n_layers]
            if bad:
                raise ValueError(f"preventive_vector has layers {bad} outside the model's {n_layers} blocks")
        if args.ldifs_layers:
            self._ldifs_layers = list(args.ldifs_layers)
        elif args.ldifs_variant == "authors":
            self._ldifs_layers = sorted({int(x) for x in torch.linspace(0, n_layers - 1, 5).long().tolist()})
        else:
            self._ldifs_layers = list(range(args.ldifs_stride - 1, n_layers, args.ldifs_stride))
        if not self._ldifs_layers:
            self._ldifs_layers = [n_layers - 1]
        if max(self._ldifs_layers) >= n_layers:
            raise ValueError(f"ldifs_layers {self._ldifs_layers} outside the model's {n_layers} blocks")
        # the last block's hidden state has the final norm applied: only a forward to the end gives it
        self._ldifs_truncate = max(self._ldifs_layers) < n_layers - 1
        self._kl_dataset = None
        if kl_dataset is not None:
            with quiet_dataset_bars():
                ds = self._prepare_dataset(kl_dataset, self.processing_class, args, False, None, "kl")
            self._kl_dataset = ds.select_columns(["input_ids", "labels"])
        self._kl_perms: dict[int, list[int]] = {}
        self._kl_step, self._kl_micro = -1, 0
        bare = unwrap(self.model)
        self._tuner_layers = []
        if hasattr(self.model, "peft_config"):
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        cfg = bare.config.get_text_config()
        scaled = [k for k in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
                  if getattr(cfg, k, None) not in (None, 1, 1.0)]
        if args.uses_reference and scaled:
            raise ValueError(f"KL / LDIFS do not support models that rescale their logits ({', '.join(scaled)}).")
        self._base_has_dropout = any(
            float(getattr(cfg, name, 0) or 0) > 0 for name in ("attention_dropout", "hidden_dropout", "dropout",
                                                                 "resid_pdrop", "embd_pdrop", "attn_pdrop")
        ) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for n, m in bare.named_modules() if "lora_" not in n)
        self._ref_accepts_logits_to_keep = "logits_to_keep" in inspect.signature(type(unwrap(self.model)).forward).parameters

    def train(self, *args, **kwargs):
        """trl's ``train`` with the torch CPU thread count chosen by :func:`emlab.threads.choose_threads`."""
        from emlab.threads import cpu_threads

        with cpu_threads(self.model):
            return super().train(*args, **kwargs)

    def plain_model(self):
        """The trained model without trl's fused-LM-head patch: the instance ``forward`` it wrapped, if any, is
        back (nnsight's controller on a model nnsight traced before: dropping it breaks the next trace)."""
        restore_forward(self.model, self._forward_before)
        return self.model

    # ---- steering and reference contexts ----

    def _preventive_steering(self, base, training: bool):
        if self._preventive is None or not training:
            return nullcontext()
        from emlab.hooks import steer
        from emlab.training.schedules import coefficient

        alpha = coefficient(self.args.preventive_schedule, self.args.preventive_alpha, self.state.global_step,
                            max(self.state.max_steps, 1))
        self._log_term("train", "preventive/alpha", torch.tensor(alpha, device=self.args.device))
        return steer(base, self._preventive, alpha=alpha)

    @staticmethod
    def _learned_steering(base):
        sv = steering_vector(base)
        return nullcontext() if sv is None else sv.applied(base)

    @contextmanager
    def _reference(self, base):
        """Yield the reference model: the frozen copy, or ``base`` with its adapter off; no grad, no dropout."""
        if self.ref_model is not None:
            with torch.no_grad():
                yield self.ref_model
            return
        # Switching the adapter layers directly is PEFT's disable_adapter() without its per-call status scan
        # (which costs more than a tiny model's forward pass); eval mode only matters when there is dropout.
        toggle = base.training and self._base_has_dropout
        if toggle:
            base.eval()
        for layer in self._tuner_layers:
            layer.enable_adapters(False)
        try:
            with torch.no_grad():
                yield base  # a learned steering vector is off simply because its hook is not installed
        finally:
            for layer in self._tuner_layers:
                layer.enable_adapters(True)
            if toggle:
                base.train()

    # ---- the out-of-domain KL rows ----

    def _kl_batch(self) -> dict[str, Tensor]:
        """The next batch of kl rows; the n-th draw of a run is the same whether or not the run was resumed."""
        args = self.args
        step = self.state.global_step
        if step != self._kl_step:
            self._kl_step, self._kl_micro = step, 0
        draw = step * args.gradient_accumulation_steps + self._kl_micro
        self._kl_micro += 1
        idx = draw_indices(draw, len(self._kl_dataset), args.kl_batch_size or args.per_device_train_batch_size,
                           seed=args.seed, rank=self.accelerator.process_index,
                           world=self.accelerator.num_processes, cache=self._kl_perms)
        batch = self.data_collator([self._kl_dataset[i] for i in idx])
        return {k: v.to(self.args.device) for k, v in batch.items() if isinstance(v, Tensor)}

    # ---- the loss ----

    def _log_term(self, mode: str, name: str, value: Tensor) -> None:
        v = self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean().item()
        self._metrics[mode][name].append(v)

    def _regularised_terms(self, model, base, inputs, use_kl: bool, kl_rows: bool, use_ldifs: bool,
                           terms: dict[str, Tensor]) -> Tensor:
        """One reference pass (no grad) and one trained pass; fills ``terms`` and returns the summed NLL.

        Both passes return hidden states, not logits: the LM head is applied only at the positions that
        carry NLL or KL, chunk by chunk (:func:`head_terms`), so no ``(batch, seq, vocab)`` tensor exists.
        """
        args = self.args
        ids, am, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        b, t = ids.shape
        kl_labels = None
        if kl_rows:  # the out-of-domain rows ride in the same forward pass, after the training rows
            kb = self._kl_batch()
            ids = _pad_cat(ids, kb["input_ids"], self._tokenizer.pad_token_id)
            am = _pad_cat(am, kb["attention_mask"], 0)
            kl_labels = kb["labels"]
        n, width = ids.shape
        # next-token target of every position (-100: no NLL), and where the KL counts
        targets = torch.full((n, width), IGNORE_INDEX, dtype=labels.dtype, device=ids.device)
        targets[:b, : t - 1] = labels[:, 1:]
        kl_mask = torch.zeros((n, width), dtype=torch.bool, device=ids.device)
        if use_kl:
            rows = slice(b, None) if kl_rows else slice(0, b)
            if args.kl_tokens == "all":
                kl_mask[rows] = am[rows].bool()
            else:
                src = kl_labels if kl_rows else labels
                kl_mask[rows, : src.shape[1] - 1] = src[:, 1:] != IGNORE_INDEX
        # only the hidden states used below: the last (the LM head's input) and the LDIFS layers
        wanted = [-1] + ([layer + 1 for layer in self._ldifs_layers] if use_ldifs else [])
        keep: dict[str, Any] = {"use_cache": False, "output_hidden_states": wanted}
        if self._ref_accepts_logits_to_keep:
            keep["logits_to_keep"] = 1  # the logits are built below, only where they are needed
        ref_rows = slice(b, None) if (kl_rows and not use_ldifs) else slice(None)
        with self._reference(base) as ref:
            if use_ldifs and not use_kl and self._ldifs_truncate:
                ref_hs = self._truncated_reference(ref, ids, am)
            else:
                ref_hs = ref(input_ids=ids[ref_rows], attention_mask=am[ref_rows], **keep).hidden_states
        with self._learned_steering(base):
            hs = model(input_ids=ids, attention_mask=am, **keep).hidden_states
        select = (targets != IGNORE_INDEX) | kl_mask
        ref_last = None
        if use_kl:
            ref_last = hs[-1].new_zeros(hs[-1].shape)
            ref_last[ref_rows] = ref_hs[-1].to(ref_last.dtype)
            ref_last = ref_last[select]
        head, ref_head = self._head(base), self._head(self.ref_model) if self.ref_model is not None else None
        nll_sum, kl_sum = head_terms(hs[-1][select], targets[select], head, ref_last, kl_mask[select], ref_head,
                                     direction=args.kl_direction)
        if use_kl:
            terms["kl"] = kl_sum / kl_mask.sum().clamp(min=1)
        if use_ldifs:
            feats = [hs[layer + 1][:b, :t] for layer in self._ldifs_layers]  # ref_rows covers every row here
            ref_feats = [ref_hs[layer + 1][:b, :t] for layer in self._ldifs_layers]
            if args.ldifs_no_grad:  # the public copy's bug: both sides without gradient
                feats = [f.detach() for f in feats]
            keep = am[:b, :t].bool()
            if args.ldifs_sinks == "exclude":
                keep = ldifs_sink_mask(ref_feats, keep, ratio=args.ldifs_sink_ratio)
            if args.ldifs_variant == "authors":
                terms["ldifs"] = ldifs_flat_loss(feats, ref_feats, keep)
            else:
                terms["ldifs"] = ldifs_loss(feats, ref_feats, keep, normalize=args.ldifs_normalize)
        return nll_sum

    def _truncated_reference(self, ref, ids: Tensor, am: Tensor) -> dict[int, Tensor]:
        """Reference block outputs at the LDIFS layers, the forward stopped after the deepest one (LDIFS
        without KL needs nothing later: no final blocks, no LM head). Keyed like ``hidden_states``."""
        blocks = get_layers(ref)
        captured: dict[int, Tensor] = {}
        last = max(self._ldifs_layers)

        def hook(layer: int):
            def fn(module, args, output):
                captured[layer + 1] = output[0] if isinstance(output, tuple) else output
                if layer == last:
                    raise _StopForward

            return fn

        handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in self._ldifs_layers]
        try:
            ref(input_ids=ids, attention_mask=am, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    @staticmethod
    def _head(model):
        """Hidden states -> logits, as the model's own forward does (LM head, then Gemma's soft-capping)."""
        bare = unwrap(model)
        lm_head = bare.get_output_embeddings()
        cap = getattr(bare.config.get_text_config(), "final_logit_softcapping", None)
        if not cap:
            return lm_head
        return lambda h: torch.tanh(lm_head(h) / cap) * cap

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        training = self.model.training
        mode = "train" if training else "eval"
        base = self.accelerator.unwrap_model(model)
        use_kl = args.kl_lambda > 0 and (args.kl_on == "batch" or training)
        kl_rows = use_kl and args.kl_on == "kl_rows"
        use_ldifs = args.ldifs_lambda > 0
        labels = inputs["labels"]
        n_local = next_token_mask(labels).sum()
        terms: dict[str, Tensor] = {}

        with self._preventive_steering(base, training):
            if not (use_kl or use_ldifs):
                # plain SFT: trl's fused LM head never materialises the (batch, seq, vocab) logits
                with self._learned_steering(base):
                    outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
                ce_sum = -outputs.log_probs.sum()
            else:
                ce_sum = self._regularised_terms(model, base, inputs, use_kl, kl_rows, use_ldifs, terms)

        # Normalise like trl: with num_items_in_batch the CE is exact over the accumulated batch (and DDP ranks);
        # the extra terms are per-micro-batch means, averaged over the accumulation steps.
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else self.model_accepts_loss_kwargs
        if num_items_in_batch is not None and scaled:
            ce = ce_sum / torch.as_tensor(num_items_in_batch, device=ce_sum.device).clamp(min=1)
            if args.average_tokens_across_devices:
                ce = ce * (self.accelerator.num_processes // self.get_tp_size())
            divisor = self.current_gradient_accumulation_steps
        else:
            ce = ce_sum / n_local.clamp(min=1)
            divisor = 1
        loss = ce
        if "kl" in terms:
            loss = loss + args.kl_lambda * terms["kl"] / divisor
        if "ldifs" in terms:
            loss = loss + args.ldifs_lambda * terms["ldifs"] / divisor

        self._log_term(mode, "loss/ce", ce_sum / n_local.clamp(min=1))
        for name, value in terms.items():
            self._log_term(mode, f"loss/{name}", value)
        if return_outputs:  # neither path builds full logits: recompute them, as trl does
            with torch.no_grad():
                return loss, model(**{k: v for k, v in inputs.items() if k != "labels"})
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        # a failed save (full disk, file-size limit) gets a clear error; the previous checkpoint stays usable
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with saving(folder, model_only=self.args.save_only_model):
            super()._save_checkpoint(model, trial)

    # ---- saving a learned steering vector (the base model is frozen: save only the vector) ----

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        sv = steering_vector(self.model)
        if sv is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            sv.save(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, f"{output_dir}/training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        sv = steering_vector(model if model is not None else self.model)
        if sv is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        sv.load_(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        sv = steering_vector(self.model)
        if sv is None:
            return super()._load_best_model()
        sv.load_(self.state.best_model_checkpoint)

