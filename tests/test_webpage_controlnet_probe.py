"""The web page's control-image upload with a file that is not an image (issue 16, bad input): the page says so
and keeps no image, instead of silently keeping the previous one (or none) with no message."""

from __future__ import annotations

from browser import require_browser

require_browser()

from test_controlnet_cli import files  # noqa: E402, F401 - the tiny SD + ControlNet files
from test_webpage_controlnet import page  # noqa: E402, F401 - the page on a server with them (shared fixture)


def test_a_file_that_is_not_an_image_is_said_and_dropped(page, files, tmp_path):  # noqa: F811
    page.set_input_files("#cn-file", str(files / "map.png"))
    page.wait_for_function("document.querySelector('#cn-enabled').checked")
    assert page.text_content("#cn-status") == "48×32"
    fake = tmp_path / "edges.png"
    fake.write_text("not a picture\n")
    page.set_input_files("#cn-file", str(fake))
    page.wait_for_selector("#error", state="visible")
    assert "edges.png is not an image this browser can read" in page.text_content("#error")
    assert not page.is_checked("#cn-enabled") and page.text_content("#cn-status") == "no control image"
    page.click("#cn-preview")  # the old image is gone, not previewed in its place
    assert page.text_content("#error") == "choose a control image first"
    page.set_input_files("#cn-file", str(files / "map.png"))  # a good one again clears the message
    page.wait_for_function("document.querySelector('#cn-enabled').checked")
    assert page.is_hidden("#error")
