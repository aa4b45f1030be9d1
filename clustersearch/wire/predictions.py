"""Out-of-fold predictions kept from a search's own fits.

A search with ``keep_predictions=True`` sends each of its
``_fit_and_score`` calls wrapped in a :class:`PredictingCall`: the node runs
the call as scikit-learn would, then predicts the call's test fold with the
estimator it fitted, and returns both as a :class:`Kept`. The client takes
the predictions off before joblib sees the result, so the search's
``cv_results_`` are built from scikit-learn's own output.

Both sides import this module (the client builds the calls, the nodes run
them): it imports nothing from the client.
"""

from __future__ import annotations

from typing import Any

from .._compat import response_method, safe_split

__all__ = ["STACK_METHODS", "Kept", "PredictingCall"]

# What StackingClassifier's stack_method="auto" tries, in order; a regressor
# stacks its predict.
STACK_METHODS = {
    "classifier": ["predict_proba", "decision_function", "predict"],
    "regressor": ["predict"],
}


class Kept:
    """What a :class:`PredictingCall` returns: the call's own result, and its
    test fold's predictions (None when the fit failed)."""

    def __init__(self, key: Any, result: Any, predictions: Any, method: str | None) -> None:
        self.key = key
        self.result = result
        self.predictions = predictions
        self.method = method


class PredictingCall:
    """Runs a ``_fit_and_score`` call and predicts its test fold.

    Parameters
    ----------
    func : callable
        The call (scikit-learn's wrapper around ``_fit_and_score``).
    key : object
        Sent back in the :class:`Kept`: which (candidate, split) this is.
    methods : list of str
        The prediction methods to try, in order (:data:`STACK_METHODS`).
    """

    def __init__(self, func: Any, key: Any, methods: list[str]) -> None:
        self.func = func
        self.key = key
        self.methods = methods
        # What the client's recovery looks at: the function this call runs.
        self.function = getattr(func, "function", func)

    def __call__(self, *args: Any, **kwargs: Any) -> Kept:
        # The fitted estimator comes back from _fit_and_score only when asked
        # for; it is taken out again, so the result is what the search expects.
        result = self.func(*args, **{**kwargs, "return_estimator": True})
        estimator = result.pop("estimator", None)
        if result.get("fit_error") is not None or estimator is None:
            return Kept(self.key, result, None, None)
        X = args[1] if len(args) > 1 else kwargs["X"]
        X_test, _ = safe_split(estimator, X, None, kwargs["test"], kwargs["train"])
        predict = response_method(estimator, self.methods)
        return Kept(self.key, result, predict(X_test), predict.__name__)
