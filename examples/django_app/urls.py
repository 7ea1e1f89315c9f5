from django.urls import path

from . import views

urlpatterns = [
    path("", views.home),
    path("private/", views.private),
    path("api/data", views.data),
    path("api/poll", views.poll),
    path("login/", views.sign_in),
    path("logout/", views.sign_out),
]
