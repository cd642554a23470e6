"""The small HTTP client the server tests share."""
import urllib.error
import urllib.request


def request(url, data=None, method="POST", headers=None):
    """(status, body bytes) for one request; HTTP errors are answers too, not exceptions."""
    # urllib's default for a body is form-urlencoded; a client sending an image says what it is.
    headers = headers or ({"Content-Type": "application/octet-stream"} if data is not None else {})
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
