"""Per-policy test cases shared by the tests in this directory."""

# kwargs that make each policy read every past token; a new policy must add itself here
EVERYTHING = {
    "full": {},
    "flexgen": {},
    "infinigen": {"ratio": 1.0, "max_ratio": 1.0},
    "rekv": {"ratio": 1.0, "max_ratio": 1.0},
    "streamingllm": {"window": 10**9},
    "resv": {"ratio": 1.0},
    "resv-noclust": {"ratio": 1.0},
}
