# -*- test-case-name: tests.k8s.test_client -*-
"""The official C{kubernetes} client, configured once and called through one blocking helper.

Everything here blocks and must run in a thread pool (the store does that).  Requests go
through C{ApiClient.param_serialize}/C{call_api} rather than the typed API classes: one code path
for core and custom kinds, bodies stay plain JSON dicts exactly as the server sends them, and
the content type (merge patch) is ours to choose rather than the generated code's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from sidero.api.registry import ResourceType
from sidero.k8s.errors import KubeconfigError, from_response, unreachable
from sidero.store import errors

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"

#: (connect, read) seconds for ordinary calls: a stuck server fails the call, not the caller.
DEFAULT_REQUEST_TIMEOUT = (5.0, 30.0)
#: Connections kept per host: every running watch holds one.
CONNECTION_POOL_SIZE = 32

IN_CLUSTER_HOST_ENV = "KUBERNETES_SERVICE_HOST"


def load_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """An C{ApiClient} from C{kubeconfig}, else C{$KUBECONFIG}, else the in-cluster service
    account, else C{~/.kube/config}.  Nothing is contacted yet.

    @raise KubeconfigError: one line naming the file (or the missing configuration) and why.
    """
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    configuration = k8s_client.Configuration()
    if path is None and os.environ.get(IN_CLUSTER_HOST_ENV):
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except ConfigException as e:
            raise KubeconfigError(f"in-cluster Kubernetes configuration unusable: {e}") from None
        return _client(configuration)
    if path is None:
        default = Path("~/.kube/config").expanduser()
        if not default.is_file():
            raise KubeconfigError(
                "no Kubernetes configuration: give a kubeconfig path, set KUBECONFIG, "
                "or run in a cluster with a service account"
            )
        path = str(default)
    # KUBECONFIG may list several files (":"); the client merges them.  Check each exists.
    for part in path.split(os.pathsep):
        p = Path(part).expanduser()
        if not p.is_file():
            raise KubeconfigError(f"kubeconfig {part} does not exist or is not a file")
    try:
        k8s_config.load_kube_config(config_file=path, client_configuration=configuration,
                                    persist_config=False)
    except ConfigException as e:
        raise KubeconfigError(f"kubeconfig {path} is not usable: {e}") from None
    except Exception as e:  # YAML errors, bad base64, unreadable files...
        raise KubeconfigError(f"kubeconfig {path} is not usable: {type(e).__name__}: {e}") from None
    return _client(configuration)


def _client(configuration: k8s_client.Configuration) -> k8s_client.ApiClient:
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return k8s_client.ApiClient(configuration)


def api_base(kind: ResourceType) -> str:
    """C{/api/v1} for the core group, C{/apis/<group>/<version>} otherwise."""
    if not kind.group:
        return f"/api/{kind.storage_version}"
    return f"/apis/{kind.group}/{kind.storage_version}"


def resource_path(
    kind: ResourceType,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a collection (no C{name}), an object, or its subresource.
    C{namespace} is dropped for cluster-scoped kinds and, for namespaced ones, None means
    every namespace (collections only)."""
    path = api_base(kind)
    if kind.namespaced and namespace:
        path += f"/namespaces/{quote(namespace, safe='')}"
    path += f"/{kind.plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
        if subresource:
            path += f"/{subresource}"
    return path


def host_of(api_client: k8s_client.ApiClient) -> str:
    return str(api_client.configuration.host)


def open_request(
    api_client: k8s_client.ApiClient,
    method: str,
    path: str,
    query: list[tuple[str, str]] | None = None,
    body: Any = None,
    content_type: str = JSON,
    timeout: Any = DEFAULT_REQUEST_TIMEOUT,
) -> Any:
    """Send one request and return the raw urllib3 response, body unread (for streams).

    @raise errors.Unavailable: the server could not be reached (refused, reset, TLS).
    @raise errors.Timeout: no answer within C{timeout}.
    """
    headers = {"Accept": JSON}
    if body is not None:
        headers["Content-Type"] = content_type
    request = api_client.param_serialize(
        method=method, resource_path=path, query_params=query or [], header_params=headers,
        body=body, auth_settings=["BearerToken"],
    )
    try:
        return api_client.call_api(*request, _request_timeout=timeout).response
    except (urllib3.exceptions.HTTPError, TimeoutError) as e:
        cause = e.reason if isinstance(e, urllib3.exceptions.MaxRetryError) else e
        # urllib3 makes NewConnectionError (refused, unroutable) a ConnectTimeoutError subclass.
        if isinstance(cause, (urllib3.exceptions.TimeoutError, TimeoutError)) and not isinstance(
            cause, urllib3.exceptions.NewConnectionError
        ):
            raise errors.Timeout(
                f"the Kubernetes API server at {host_of(api_client)} did not answer {method} {path} in time"
            ) from e
        raise unreachable(host_of(api_client), e) from e
    except ApiException as e:  # status 0: the client's wrapping of TLS failures
        raise unreachable(host_of(api_client), Exception(e.reason)) from e
    except OSError as e:
        raise unreachable(host_of(api_client), e) from e


def request(
    api_client: k8s_client.ApiClient,
    method: str,
    path: str,
    query: list[tuple[str, str]] | None = None,
    body: Any = None,
    content_type: str = JSON,
    timeout: Any = DEFAULT_REQUEST_TIMEOUT,
) -> tuple[int, Any]:
    """Send one request and return C{(status, decoded JSON body)} for a 2xx answer.

    @raise errors.StoreError: the server's C{Status} for any other answer.
    """
    response = open_request(api_client, method, path, query, body, content_type, timeout)
    try:
        data = response.data
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise unreachable(host_of(api_client), e) from e
    finally:
        response.release_conn()
    status = int(response.status)
    if not 200 <= status <= 299:
        raise from_response(status, data, f"{method} {path}")
    try:
        return status, json.loads(data) if data else None
    except ValueError as e:
        raise errors.StoreError(f"{method} {path}: the API server sent invalid JSON: {e}") from None
