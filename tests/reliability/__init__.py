"""Reliability suite: fuzzing over the wire, kill -9 during writes, hostile paths, engine faults,
client deadlines. Every test runs a real gRPC server on 127.0.0.1 and real peft adapters on a tiny
random Llama that carries SmolLM2's tokenizer. (A package, so its module names cannot collide
with tests elsewhere.)"""
