from __future__ import annotations

from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from lapse.web.app import safe_next


def who(request: HttpRequest) -> str | None:
    """Standalone mode: the user lapse signed in; alongside: Django's."""
    if request.user.is_authenticated:
        return request.user.get_username()
    return getattr(request, "lapse_user", None)


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "page.html", {"title": "Home", "who": who(request)})


def private(request: HttpRequest) -> HttpResponse:
    if who(request) is None:  # alongside: the app's own rule; standalone: lapse answered already
        return redirect_to_login(request.get_full_path())
    return render(request, "page.html", {"title": "Private", "who": who(request)})


def data(request: HttpRequest) -> JsonResponse:
    if who(request) is None:
        return JsonResponse({"error": "sign in"}, status=401)
    return JsonResponse({"user": who(request)})


def poll(request: HttpRequest) -> JsonResponse:  # a passive path in lapse.toml: never extends the session
    return JsonResponse({"user": who(request), "news": []})


def sign_in(request: HttpRequest) -> HttpResponse:
    context = {"next": safe_next(request.GET.get("next")), "reason": request.GET.get("reason")}
    if request.method == "POST":
        user = authenticate(request, username=request.POST.get("username"), password=request.POST.get("password"))
        if user is not None:
            login(request, user)  # lapse starts a new session of its own (and ends any older one)
            return redirect(safe_next(request.POST.get("next")))
        context.update(next=safe_next(request.POST.get("next")), message="Wrong user name or password.")
    return render(request, "login.html", context)


@require_POST
def sign_out(request: HttpRequest) -> HttpResponse:
    logout(request)  # lapse ends its session too (session.revoked, reason logout)
    return redirect("/")
