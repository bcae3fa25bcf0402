"""HIL scenarios: scripted end-to-end runs with a verdict (`dergw hil scenario NAME --check`)."""
