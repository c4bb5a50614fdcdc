"""Compose two adapters on a running server and show the composition doing what neither does alone.

    adapter-fusion serve                      # in one terminal (loads the demo adapters)
    python examples/grpc_client.py            # in another

The prompts are the first test requests of the `json_or_upper` mixture (`adapter_fusion.tasks`):
key=value pairs to turn into JSON, and text to rewrite in capitals, interleaved. Each single
adapter answers its own kind; the composition, an inline `linear` recipe of both at 0.5, answers
both (0.65 exact on 20 test requests, bench/results/composition.md), with no merge at all: its rows
carry per-source weights over the two resident adapters, in the same batch as everything else.
Then the same recipe is composed once and registered under a name (ComposeAdapter).
"""

from __future__ import annotations

import argparse

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.tasks import examples, user_message

PARTS = {"kv_json": 0.5, "uppercase": 0.5}
PROMPTS = [(user_message("json_or_upper", ex), ex.target) for ex in examples("json_or_upper", "test", 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    recipe = make_recipe("linear", PARTS)
    with Client(args.address, token=args.token) as client:
        print("adapters:", ", ".join(f"{a.name} (rank {a.rank})" for a in client.list_adapters()))
        columns = [*PARTS, "composed (no merge)"]
        print(f"{'prompt':<44} {'expected':<28} " + " ".join(f"{c:<28}" for c in columns))
        right = dict.fromkeys(columns, 0)
        for prompt, expected in PROMPTS:
            answers = [client.chat(prompt, adapter=name, max_new_tokens=32) for name in PARTS]
            answers.append(client.chat(prompt, recipe=recipe, max_new_tokens=32))
            for column, answer in zip(columns, answers):
                right[column] += answer.strip() == expected
            shown = prompt.replace("\n", " | ")
            print(f"{shown[-43:]:<44} {expected[:27]:<28} " + " ".join(f"{a.strip()[:27]:<28}" for a in answers))
        print("exact:", ", ".join(f"{c} {right[c]}/{len(PROMPTS)}" for c in columns))
        reply = client.compose("json-or-upper", recipe)
        print(f"registered {reply.adapter.name}: rank {reply.adapter.rank}; it answers as the inline recipe did:")
        print(f"> {PROMPTS[0][0]!r}\n{client.chat(PROMPTS[0][0], adapter='json-or-upper', max_new_tokens=32)}")
        client.unload_adapter("json-or-upper")


if __name__ == "__main__":
    main()
