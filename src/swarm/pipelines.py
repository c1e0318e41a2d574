"""The `text2text-generation` pipeline, which transformers 5 removed, for encoder-decoder models (T5, ...).

`import swarm` registers it, so that `pipeline("text2text-generation", model=model, tokenizer=tokenizer)` takes
text in and gives the decoder's generated text out, for a distributed model as for a local one. Its output is
what transformers 4 gave: `[{"generated_text": ...}]` per input text, one entry per returned sequence, and for a
list of texts with one sequence each, one entry per text.
"""

from __future__ import annotations

from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

TASK = "text2text-generation"


class Text2TextGenerationPipeline(Pipeline):
    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, truncation=None, clean_up_tokenization_spaces=None, **generate_kwargs):
        preprocess = {} if truncation is None else {"truncation": truncation}
        postprocess = {} if clean_up_tokenization_spaces is None else {"clean_up_tokenization_spaces": clean_up_tokenization_spaces}
        return preprocess, generate_kwargs, postprocess

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(len(answers) == 1 for answers in result):
            return [answers[0] for answers in result]
        return result

    def preprocess(self, text: str, truncation: bool = False):
        if not isinstance(text, str):
            raise TypeError(f"{TASK} takes a text or a list of texts, not {type(text).__name__}")
        return self.tokenizer(text, return_tensors="pt", truncation=truncation)

    def _forward(self, model_inputs, **generate_kwargs):
        return {"output_ids": self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))}

    def postprocess(self, model_outputs, clean_up_tokenization_spaces: bool = False):
        decode = dict(skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        return [{"generated_text": self.tokenizer.decode(ids, **decode)} for ids in model_outputs["output_ids"]]


def register_text2text_generation():
    """Registers the task with transformers' pipelines, unless it is there already."""
    if TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    REMOVED_TASKS.pop(TASK, None)
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=Text2TextGenerationPipeline, pt_model=AutoModelForSeq2SeqLM)
