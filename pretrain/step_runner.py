"""One optimizer step (and one evaluation pass) for each kind of DeepSpeed engine, behind one
interface: the trainer hands over an iterator of batches and λ, and gets one `MTPOutput` per
micro-batch back (none on ranks that do not run the tail).

* `WholeModelRunner` (PP = 1): DeepSpeed's ordinary engine; forward, backward and step per
  micro-batch (DeepSpeed applies the optimizer at the accumulation boundary).
* `PipelineRunner` (PP > 1): DeepSpeed's PipelineEngine runs the whole schedule in
  `train_batch`; the output tail runs inside the engine's loss function on the last stage, so the
  runner owns that function and collects its outputs there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data_pipeline import document_ids
from model import MTPOutput
from pretrain.model_builder import TailLoss


class StepRunner:
    def __init__(self, engine, device: torch.device, grad_accum: int,
                 document_eos: int | None = None):
        """`document_eos`: with document-masked attention, the EOS id that ends documents
        (each batch then carries `doc_ids`, the document of every position)."""
        self.engine = engine
        self.device = device
        self.grad_accum = grad_accum
        self.document_eos = document_eos

    def to_device(self, batch: dict) -> dict:
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.document_eos is not None:
            b["doc_ids"] = document_ids(b["input_ids"], self.document_eos)  # [B, T]
        return b

    def train_step(self, batches: Iterator[dict] | None, mtp_weight: float,
                   step: int) -> list[MTPOutput]:
        """One optimizer step over `grad_accum` micro-batches drawn from `batches` (None on
        pipeline stages that read no data)."""
        raise NotImplementedError

    def evaluate(self, batches: Iterator[dict] | None, micro_batches: int, mtp_weight: float,
                 step: int) -> list[MTPOutput]:
        """Forward passes without gradients over (up to) `micro_batches` micro-batches."""
        raise NotImplementedError


class WholeModelRunner(StepRunner):
    def train_step(self, batches, mtp_weight, step):
        outputs = []
        for _ in range(self.grad_accum):
            b = self.to_device(next(batches))
            out = self.engine(b["input_ids"], b["labels"], b["loss_mask"],
                              mtp_weight=mtp_weight, step=step, doc_ids=b.get("doc_ids"))
            self.engine.backward(out.loss)
            self.engine.step()
            outputs.append(out)
        return outputs

    def evaluate(self, batches, micro_batches, mtp_weight, step):
        outputs = []
        for _, batch in zip(range(micro_batches), batches):
            b = self.to_device(batch)
            outputs.append(self.engine(b["input_ids"], b["labels"], b["loss_mask"],
                                       mtp_weight=mtp_weight, step=step,
                                       doc_ids=b.get("doc_ids")))
        return outputs


class PipelineRunner(StepRunner):
    def __init__(self, engine, device, grad_accum, loss_fn: TailLoss,
                 document_eos: int | None = None):
        super().__init__(engine, device, grad_accum, document_eos)
        self.loss_fn = loss_fn

    def _pipe_batches(self, batches):
        # The pipeline engine reads the inputs on the first stage and (labels, mask) on the
        # last; with document masks the stages pass the documents along with the activations.
        for batch in batches:
            b = self.to_device(batch)
            inputs = b["input_ids"] if "doc_ids" not in b else (b["input_ids"], b["doc_ids"])
            yield inputs, (b["labels"], b["loss_mask"])

    def _run(self, mtp_weight: float, step: int, call) -> list[MTPOutput]:
        self.loss_fn.mtp_weight, self.loss_fn.step = mtp_weight, step
        self.loss_fn.outputs.clear()
        call()
        outputs = list(self.loss_fn.outputs)
        self.loss_fn.outputs.clear()
        return outputs

    def train_step(self, batches, mtp_weight, step):
        it = self._pipe_batches(batches) if batches is not None else None
        return self._run(mtp_weight, step, lambda: self.engine.train_batch(data_iter=it))

    def evaluate(self, batches, micro_batches, mtp_weight, step):
        # eval_batch runs `grad_accum` micro-batches per call.
        it = self._pipe_batches(batches) if batches is not None else None
        rounds = max(1, micro_batches // self.grad_accum)

        def run():
            for _ in range(rounds):
                self.engine.eval_batch(it)

        return self._run(mtp_weight, step, run)
