"""Forecasting: yearly sunspot numbers (statsmodels), one year ahead.

Train on 1700-1920, test on 1921-1955 (the split of the classic AR studies): from the
previous ``--window`` years, predict the next. The test RMSE is compared with the two
baselines on the same years: persistence (next = this year, 25.3) and an AR(9) model
fitted on the training years (13.8). Needs ``pip install "cylstm[examples]"``.

    python examples/sunspots.py          # a few seconds on 2 cores
"""

import argparse

import numpy as np

import cylstm

SCALE = 100.0          # sunspot numbers are 0..~190: /100 keeps the inputs near 1


def load():
    import statsmodels.api as sm
    data = sm.datasets.sunspots.load_pandas().data
    return data["YEAR"].to_numpy().astype(int), data["SUNACTIVITY"].to_numpy()


def windows(series, targets, window):
    """x (N, window, 1) of the years before each target index, y (N, 1)."""
    x = np.stack([series[t - window:t] for t in targets])[:, :, None]
    return (x / SCALE).astype(np.float32), (series[targets] / SCALE)[:, None].astype(np.float32)


def baselines(years, series):
    """(persistence RMSE, AR(9) RMSE) on 1921-1955, AR fitted by least squares on 1700-1920."""
    test = np.flatnonzero((years >= 1921) & (years <= 1955))
    train = series[years <= 1920]
    p = 9
    rows = np.stack([np.r_[1.0, train[t - p:t][::-1]] for t in range(p, len(train))])
    coef = np.linalg.lstsq(rows, train[p:], rcond=None)[0]
    ar = np.array([coef @ np.r_[1.0, series[t - p:t][::-1]] for t in test])
    rmse = lambda pred: float(np.sqrt(np.mean((series[test] - pred) ** 2)))
    return rmse(series[test - 1]), rmse(ar)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)

    years, series = load()
    W = args.window
    train_t = np.arange(W, np.searchsorted(years, 1920) + 1)           # targets 1700+W..1920
    test_t = np.flatnonzero((years >= 1921) & (years <= 1955))
    x_train, y_train = windows(series, train_t, W)
    x_test, y_test = windows(series, test_t, W)

    model = cylstm.Sequential([
        cylstm.LSTM(1, args.hidden_size, batch_first=True),
        cylstm.LastStep(),
        cylstm.Linear(args.hidden_size, 1),
    ], seed=args.seed)
    model.compile(loss="mse", optimizer="adam", lr=3e-3, metrics=["rmse"])
    model.fit(x_train, y_train, batch_size=16, epochs=args.epochs, verbose=args.verbose,
              callbacks=[cylstm.callbacks.CosineAnnealing(args.epochs, 1e-4)])
    pred = model.predict(x_test)[:, 0] * SCALE
    rmse = float(np.sqrt(np.mean((pred - series[test_t]) ** 2)))
    persistence, ar9 = baselines(years, series)
    print(f"test RMSE 1921-1955: LSTM {rmse:.2f}   persistence {persistence:.2f}   "
          f"AR(9) {ar9:.2f}")
    return {"rmse": rmse, "persistence": persistence, "ar9": ar9}


if __name__ == "__main__":
    main()
