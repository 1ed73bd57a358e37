"""A user reward function for the tests: it raises on some samples (a deterministic choice)."""


def score(responses, answers, tasks):
    for response in responses:
        if len(response) % 3 == 0:
            raise RuntimeError(f"cannot score a response of {len(response)} characters")
    return [1.0 if r.strip() else 0.0 for r in responses]
