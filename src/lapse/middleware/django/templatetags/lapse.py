"""``{% load lapse %}{% lapse_widget %}``: the countdown widget's script tag (texts and a CSP nonce
as keyword arguments, e.g. ``{% lapse_widget text_idle="..." nonce=request.csp_nonce %}``)."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString, mark_safe

from lapse.middleware.jinja import lapse_widget as _tag

register = template.Library()


@register.simple_tag(name="lapse_widget")
def lapse_widget(nonce: str | None = None, **data: str) -> SafeString:
    return mark_safe(str(_tag(nonce=nonce, **data)))  # escaped by the Jinja helper: markupsafe
