"""A Python client for exitserve's v1 API: sync (:class:`Client`) and async (:class:`AsyncClient`).

Typed results, the API key, timeouts, deadline propagation (a request's ``deadline_ms`` bounds the HTTP
timeout and every retry; a retry sends what is left of it) and retries on 429 and 503 that honour the
server's ``Retry-After`` up to ``max_retry_wait_s``. Only ``httpx`` is needed::

    from exitserve_client import Client

    with Client("http://localhost:8000", api_key="...") as client:
        result = client.classify(["win a free cruise", "lunch at noon?"], speed=0.5)
        for prediction in result.predictions:
            print(prediction.label, prediction.score, prediction.exit_layer)
"""

from exitserve_client._client import (
    AsyncClient,
    Classification,
    Client,
    ExitserveError,
    Prediction,
    RetryPolicy,
)

__all__ = ["AsyncClient", "Classification", "Client", "ExitserveError", "Prediction", "RetryPolicy"]
