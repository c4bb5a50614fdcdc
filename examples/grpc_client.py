"""Compose two adapters on a running server and stream a generation with the composition.

    adapter-fusion serve                      # in one terminal (loads the demo adapters)
    python examples/grpc_client.py            # in another
"""

from __future__ import annotations

import argparse

from adapter_fusion.client import Client, make_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    with Client(args.address, token=args.token) as client:
        print("adapters:", ", ".join(f"{a.name} (rank {a.rank})" for a in client.list_adapters()))
        reply = client.compose("upper-reverse", make_recipe("ties", {"uppercase": 1.0, "reverse_words": 1.0}, rank=8, density=0.5))
        worst = min(m.energy_kept for m in reply.report)
        print(f"composed {reply.adapter.name}: rank {reply.adapter.rank}, lowest energy kept {worst:.3f}")
        prompt = "Write the words in reverse order, in uppercase letters.\nguitar river orange"
        print(f"> {prompt}")
        for message in client.generate(messages=[{"role": "user", "content": prompt}], adapter="upper-reverse", max_new_tokens=24):
            print(message.text, end="", flush=True)
            if message.finish_reason:
                print(f"\n[{message.finish_reason}: {message.usage.completion_tokens} tokens]")
        client.unload_adapter("upper-reverse")


if __name__ == "__main__":
    main()
