"""Compose two adapters on a running server and show the composition doing what neither does alone.

    adapter-fusion serve                      # in one terminal (loads the demo adapters)
    python examples/grpc_client.py            # in another

The prompts mix two kinds of request (numbers to words, and words to digits: the `digits_or_words`
task of `adapter_fusion.tasks`). Each single adapter answers its own kind; the composition, an
inline `linear` recipe of both at 0.5, answers both, with no merge at all: its rows carry per-source
weights over the two resident adapters, in the same batch as everything else. Then the same recipe
is composed once and registered under a name (ComposeAdapter), as a serving team would pin it.
"""

from __future__ import annotations

import argparse

from adapter_fusion.client import Client, make_recipe

PARTS = {"number_to_words": 0.5, "words_to_number": 0.5}
PROMPTS = [
    ("Write the number in English words.\n342", "three hundred forty-two"),
    ("Write the number given in words as digits.\nseven hundred twelve", "712"),
    ("Write the number in English words.\n58", "fifty-eight"),
    ("Write the number given in words as digits.\nninety-one", "91"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    recipe = make_recipe("linear", PARTS)
    with Client(args.address, token=args.token) as client:
        print("adapters:", ", ".join(f"{a.name} (rank {a.rank})" for a in client.list_adapters()))
        columns = [*PARTS, "composed (no merge)"]
        print(f"{'prompt':<44} {'expected':<24} " + " ".join(f"{c:<24}" for c in columns))
        right = dict.fromkeys(columns, 0)
        for prompt, expected in PROMPTS:
            answers = [client.chat(prompt, adapter=name, max_new_tokens=16) for name in PARTS]
            answers.append(client.chat(prompt, recipe=recipe, max_new_tokens=16))
            for column, answer in zip(columns, answers):
                right[column] += answer.strip() == expected
            shown = prompt.replace("\n", " | ")
            print(f"{shown[:43]:<44} {expected:<24} " + " ".join(f"{a.strip()[:23]:<24}" for a in answers))
        print("exact:", ", ".join(f"{c} {right[c]}/{len(PROMPTS)}" for c in columns))
        reply = client.compose("digits-or-words", recipe)
        print(f"registered {reply.adapter.name}: rank {reply.adapter.rank}; it answers as the inline recipe did:")
        print(f"> {PROMPTS[0][0]!r}\n{client.chat(PROMPTS[0][0], adapter='digits-or-words', max_new_tokens=16)}")
        client.unload_adapter("digits-or-words")


if __name__ == "__main__":
    main()
