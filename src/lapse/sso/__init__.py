"""Sign-in through an OpenID Connect provider (CONTRACT.md §2 ``[oidc]``, §4).

``tokens`` is pure (no I/O, no clock): it judges ID tokens and logout tokens
against a key set it is given. ``provider`` talks to the IdP (discovery,
JWKS with rotation, the token endpoint). ``flow`` binds a login to the browser
that started it. ``lapse.web.oidc`` is the thin HTTP adapter over all three.
"""
