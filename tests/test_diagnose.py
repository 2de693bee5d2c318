"""The launcher-output watch: known failures become one line naming the fix."""

from largebatch.launchers import diagnose


def test_known_failures_become_one_hint_each():
    watch = diagnose.OutputWatch(gloo_across_hosts=True)
    watch.feed("[0]<stderr>:RuntimeError: HTTP GET request failed too many times, aborting. See\n[1]<std")
    watch.feed("err>:terminate called after throwing an instance of 'gloo::EnforceNotMet'\n  what():  [enforce "
               "fail at gloo/transport/tcp/device.cc:83] ifa != nullptr. Unable to find address for: lbh1\n")
    watch.feed("HTTP GET request failed too many times\nSegmentation fault (core dumped)")
    found = watch.findings()
    assert len(found) == 3
    assert found[0].startswith("the ranks could not reach horovodrun's Gloo rendezvous server on the launch node")
    assert found[1].startswith("Gloo could not resolve the host name 'lbh1' on a host")
    assert found[2].startswith("a rank crashed with a segmentation fault: with Gloo across hosts")


def test_nothing_found_in_a_healthy_run_and_segfaults_only_for_gloo_across_hosts():
    watch = diagnose.OutputWatch()
    watch.feed("epoch 1: eval loss 0.1\rstep 3\nSegmentation fault\n")
    assert watch.findings() == []
