//! `/upload/image`, `/upload/mask` and `/view` over HTTP: ComfyUI's naming and answers, and the
//! path checks Easel adds.

mod common;

use common::{start, Server};
use serde_json::{json, Value as Json};

const BOUNDARY: &str = "easel-test-boundary";

/// A `multipart/form-data` body with an `image` file part and text fields.
fn form(filename: &str, bytes: &[u8], fields: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes(),
        );
    }
    body.extend(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n")
            .bytes(),
    );
    body.extend(bytes);
    body.extend(format!("\r\n--{BOUNDARY}--\r\n").bytes());
    body
}

fn upload(server: &Server, route: &str, body: Vec<u8>) -> (u16, Json) {
    let agent = common::agent();
    let mut response = agent
        .post(format!("{}{route}", server.api.url))
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .send(&body[..])
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Json::Null))
}

fn png(width: u32, height: u32, rgba: [u8; 4]) -> Vec<u8> {
    let image = image::RgbaImage::from_pixel(width, height, image::Rgba(rgba));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

#[test]
fn uploads_are_named_like_comfyui() {
    let server = start();
    let first = png(4, 4, [0, 255, 0, 128]);
    let other = png(4, 4, [255, 0, 0, 255]);
    let fields = [("subfolder", "sub"), ("type", "temp")];
    assert_eq!(
        upload(&server, "/upload/image", form("a.png", &first, &fields)),
        (200, json!({"name": "a.png", "subfolder": "sub", "type": "temp"}))
    );
    // The same bytes again: a duplicate, same name; other bytes: "a (1).png"; overwrite keeps the name.
    assert_eq!(
        upload(&server, "/upload/image", form("a.png", &first, &fields)).1["name"],
        "a.png"
    );
    assert_eq!(
        upload(&server, "/api/upload/image", form("a.png", &other, &fields)).1["name"],
        "a (1).png"
    );
    let overwrite = [("subfolder", "sub"), ("type", "temp"), ("overwrite", "true")];
    assert_eq!(
        upload(&server, "/upload/image", form("a.png", &other, &overwrite)).1["name"],
        "a.png"
    );
    let stored = std::fs::read(server.base.path().join("temp/sub/a.png")).unwrap();
    assert_eq!(stored, other);

    for (filename, fields) in [
        ("a.png", vec![("subfolder", "../..")]),
        ("../a.png", vec![]),
        ("a\\b.png", vec![]),
        ("", vec![]),
        ("a.png", vec![("type", "bogus")]),
    ] {
        let (status, _) = upload(&server, "/upload/image", form(filename, &first, &fields));
        assert_eq!(status, 400, "{filename} {fields:?}");
    }
}

#[test]
fn a_mask_upload_replaces_the_alpha_of_the_original() {
    let server = start();
    upload(
        &server,
        "/upload/image",
        form("photo.png", &png(3, 2, [0, 255, 0, 128]), &[("type", "input")]),
    );
    let original_ref = json!({"filename": "photo.png", "type": "input"}).to_string();
    let fields = [
        ("type", "input"),
        ("subfolder", "clipspace"),
        ("original_ref", original_ref.as_str()),
    ];
    let (status, body) = upload(
        &server,
        "/upload/mask",
        form("mask.png", &png(3, 2, [9, 9, 9, 0]), &fields),
    );
    assert_eq!(
        (status, body),
        (
            200,
            json!({"name": "mask.png", "subfolder": "clipspace", "type": "input"})
        )
    );
    let stored = image::open(server.base.path().join("input/clipspace/mask.png"))
        .unwrap()
        .to_rgba8();
    assert_eq!(stored.get_pixel(1, 1).0, [0, 255, 0, 0]);

    // An original that does not exist: 200, nothing written.
    let missing = json!({"filename": "nope.png", "type": "input"}).to_string();
    let fields = [("type", "input"), ("original_ref", missing.as_str())];
    assert_eq!(
        upload(
            &server,
            "/upload/mask",
            form("m2.png", &png(3, 2, [0, 0, 0, 0]), &fields)
        )
        .0,
        200
    );
    assert!(!server.base.path().join("input/m2.png").exists());
}

#[test]
fn view_serves_previews_channels_and_only_media_inline() {
    let server = start();
    upload(
        &server,
        "/upload/image",
        form("pic.png", &png(5, 4, [10, 20, 30, 40]), &[("type", "output")]),
    );
    let (status, content_type, bytes) = server.api.get("/view?filename=pic.png&preview=jpeg;80");
    assert_eq!((status, content_type.as_str()), (200, "image/jpeg"));
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 5);
    let (_, content_type, _) = server.api.get("/view?filename=pic.png&preview=png");
    assert_eq!(content_type, "image/webp");

    // WebP previews are lossy (a `VP8 ` chunk) at the quality asked for, and keep alpha as PIL does.
    let (_, content_type, bytes) = server.api.get("/view?filename=pic.png&preview=webp;50");
    assert_eq!(content_type, "image/webp");
    assert!(bytes.windows(4).any(|w| w == b"VP8 ") && !bytes.windows(4).any(|w| w == b"VP8L"));
    assert_eq!(
        image::load_from_memory(&bytes).unwrap().to_rgba8().get_pixel(2, 2).0[3],
        40
    );
    let noise: Vec<u8> = (0u32..64 * 64 * 3)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut noisy = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(64, 64, noise)
        .unwrap()
        .write_to(&mut noisy, image::ImageFormat::Png)
        .unwrap();
    upload(
        &server,
        "/upload/image",
        form("noise.png", &noisy.into_inner(), &[("type", "output")]),
    );
    let size = |quality: u8| {
        server
            .api
            .get(&format!("/view?filename=noise.png&preview=webp;{quality}"))
            .2
            .len()
    };
    assert!(size(10) < size(95), "quality must change the encoding");
    let (_, content_type, bytes) = server.api.get("/view?filename=pic.png&channel=a");
    assert_eq!(content_type, "image/png");
    assert_eq!(
        image::load_from_memory(&bytes).unwrap().to_rgba8().get_pixel(0, 0).0,
        [0, 0, 0, 40]
    );
    let (_, _, bytes) = server.api.get("/view?filename=pic.png&channel=rgb");
    assert_eq!(image::load_from_memory(&bytes).unwrap().color(), image::ColorType::Rgb8);

    // A file a browser would run is an attachment; a symlink out of the directory is refused.
    std::fs::write(server.base.path().join("output/page.html"), "<script>alert(1)</script>").unwrap();
    let agent = common::agent();
    let response = agent
        .get(format!("{}/view?filename=page.html", server.api.url))
        .call()
        .unwrap();
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/octet-stream"
    );
    assert!(response
        .headers()
        .get("content-disposition")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(response.headers().get("x-content-type-options").unwrap(), "nosniff");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/etc/hostname", server.base.path().join("output/link.png")).unwrap();
        assert_eq!(server.api.get("/view?filename=link.png").0, 403);
    }
}

#[test]
fn view_answers_ranges_and_conditional_requests() {
    let server = start();
    std::fs::write(server.base.path().join("output/data.png"), b"0123456789").unwrap();
    let agent = common::agent();
    let url = format!("{}/view?filename=data.png", server.api.url);
    let full = agent.get(&url).call().unwrap();
    let etag = full.headers().get("etag").unwrap().to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with("-a\""), "{etag}");
    assert_eq!(full.headers().get("accept-ranges").unwrap(), "bytes");
    assert!(full.headers().get("last-modified").is_some());
    assert_eq!(
        agent
            .get(&url)
            .header("If-None-Match", &etag)
            .call()
            .unwrap()
            .status()
            .as_u16(),
        304
    );
    let mut part = agent.get(&url).header("Range", "bytes=2-4").call().unwrap();
    assert_eq!(part.status().as_u16(), 206);
    assert_eq!(part.headers().get("content-range").unwrap(), "bytes 2-4/10");
    assert_eq!(part.body_mut().read_to_string().unwrap(), "234");
    let mut tail = agent.get(&url).header("Range", "bytes=-3").call().unwrap();
    assert_eq!(tail.body_mut().read_to_string().unwrap(), "789");
    assert_eq!(
        agent
            .get(&url)
            .header("Range", "bytes=20-")
            .call()
            .unwrap()
            .status()
            .as_u16(),
        416
    );
}

/// An upload never writes through a symlink out of the input folder: a name that is a link to a
/// file outside is replaced by the upload (the outside file is untouched), and a subfolder through
/// a link to a folder outside is refused before anything is created there.
#[cfg(unix)]
#[test]
fn uploads_never_write_through_symlinks_out_of_the_input_folder() {
    let server = start();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("target.png");
    std::fs::write(&target, b"outside").unwrap();
    let input = server.base.path().join("input");
    std::os::unix::fs::symlink(&target, input.join("x.png")).unwrap();
    let image = png(2, 2, [1, 2, 3, 255]);
    let (status, body) = upload(
        &server,
        "/upload/image",
        form("x.png", &image, &[("overwrite", "true")]),
    );
    assert_eq!((status, &body["name"]), (200, &json!("x.png")));
    assert_eq!(std::fs::read(&target).unwrap(), b"outside");
    let written = std::fs::symlink_metadata(input.join("x.png")).unwrap();
    assert!(written.file_type().is_file(), "the link was replaced by the upload");
    assert_eq!(std::fs::read(input.join("x.png")).unwrap(), image);

    // A dangling link under the new name is replaced too, never followed.
    let dangling = outside.path().join("created.png");
    std::os::unix::fs::symlink(&dangling, input.join("y.png")).unwrap();
    let (status, _) = upload(&server, "/upload/image", form("y.png", &image, &[]));
    assert_eq!(status, 200);
    assert!(!dangling.exists());

    std::os::unix::fs::symlink(outside.path(), input.join("elsewhere")).unwrap();
    let (status, _) = upload(
        &server,
        "/upload/image",
        form("z.png", &image, &[("subfolder", "elsewhere/new/deeper")]),
    );
    assert_eq!(status, 400);
    assert!(!outside.path().join("new").exists(), "no folder was made outside");
}
