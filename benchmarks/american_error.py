"""How far the European model's IV is from the truth for American options: a binomial tree
(Cox-Ross-Rubinstein, 2,000 steps) prices each option American and European; the difference of
the IVs :mod:`options.jobs.greeks` finds for the two prices is the model's error (the tree's
own discretisation cancels). Spot 100, volatility 30%, rate 4%, no dividend.

    .venv/bin/python benchmarks/american_error.py
"""

from __future__ import annotations

import numpy as np

from options.jobs.greeks import implied_volatility

SPOT, VOL, RATE, STEPS = 100.0, 0.3, 0.04, 2000


def tree(strike: float, years: float, call: bool, *, american: bool) -> float:
    step = years / STEPS
    up = np.exp(VOL * np.sqrt(step))
    down = 1 / up
    p = (np.exp(RATE * step) - down) / (up - down)
    discount = np.exp(-RATE * step)
    j = np.arange(STEPS + 1)
    value = np.maximum((SPOT * up ** (STEPS - j) * down**j - strike) * (1 if call else -1), 0)
    for i in range(STEPS - 1, -1, -1):
        j = np.arange(i + 1)
        value = discount * (p * value[:-1] + (1 - p) * value[1:])
        if american:
            exercise = (SPOT * up ** (i - j) * down**j - strike) * (1 if call else -1)
            value = np.maximum(value, exercise)
    return float(value[0])


def iv(price: float, strike: float, years: float, call: bool) -> float:
    return float(
        implied_volatility(
            np.array([price]),
            np.array([SPOT]),
            np.array([strike]),
            np.array([years]),
            np.array([call]),
            RATE,
            0.0,
        )[0]
    )


def main() -> None:
    print("type  strike  years  American price  IV error")
    for call in (True, False):
        for strike in (80.0, 100.0, 120.0):
            for years in (0.1, 0.5, 1.0):
                american = tree(strike, years, call, american=True)
                european = tree(strike, years, call, american=False)
                error = iv(american, strike, years, call) - iv(european, strike, years, call)
                kind = "call" if call else "put"
                print(f"{kind:4}  {strike:6.0f}  {years:5.1f}  {american:14.4f}  {error:+8.4f}")


if __name__ == "__main__":
    main()
