"""Sign-in through an OpenID Connect provider (CONTRACT.md §2 ``[oidc]``, §4).

``tokens`` is pure (no I/O, no clock): it judges ID tokens and logout tokens
against a key set it is given. ``provider`` talks to the IdP (discovery,
JWKS with rotation, the token endpoint). ``flow`` binds a login to the browser
that started it. ``lapse.web.oidc`` is the thin HTTP adapter over all three.
"""


def name_claim(name: str) -> str:
    """The store ``claim`` that binds a lapse user name to one IdP account (``iss``, ``sub``): by the name
    without regard to case, as local names are compared (web.oidc binds it; ``lapse users unbind`` drops it)."""
    return "oidc-user:" + name.casefold()
