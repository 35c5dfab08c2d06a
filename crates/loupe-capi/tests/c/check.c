/* libloupe from C, as an app uses it: crates/loupe-capi/tests/c_api.rs compiles this file against
 * include/loupe.h and libloupe, runs it, and compares what it prints with the Rust engine's own
 * answers on the same inputs.
 *
 *   check MODEL SPEC IMAGE PIXELS WIDTH HEIGHT      everything below
 *   check MODEL                                      load and free only (the shared-library build)
 *
 * IMAGE is an encoded image file; PIXELS the same image decoded to raw RGB (WIDTH x HEIGHT).
 * Output: one line per fact, `key<TAB>value`, values JSON (strings escaped). A broken promise of
 * the API (a status, a NULL, a stream that differs from the answer) exits 1 with the line. */

#define _POSIX_C_SOURCE 200809L

#include "loupe.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "check.c:%d: %s: ", __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, " (last error: %s)\n", loupe_last_error());         \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

static void print_json_string(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            printf("\\%c", c);
        } else if (c < 0x20) {
            printf("\\u%04x", c);
        } else {
            putchar(c);
        }
    }
    putchar('"');
}

static void print_text(const char *key, const char *s, size_t n) {
    printf("%s\t", key);
    print_json_string(s, n);
    putchar('\n');
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(size > 0 ? (size_t)size : 1);
    CHECK(fread(data, 1, (size_t)size, f) == (size_t)size, "cannot read %s", path);
    fclose(f);
    *len = (size_t)size;
    return data;
}

/* A status and message from a call that must fail: `bad<TAB>NAME<TAB>STATUS<TAB>"MESSAGE"`. */
static void bad(const char *name, LoupeStatus status) {
    CHECK(status != LOUPE_STATUS_OK, "%s succeeded", name);
    const char *msg = loupe_last_error();
    CHECK(msg != NULL && msg[0] != '\0', "%s: no message", name);
    printf("bad\t%s\t%d\t", name, (int)status);
    print_json_string(msg, strlen(msg));
    putchar('\n');
}

static void pause_ms(long ms) {
    struct timespec t = {.tv_sec = 0, .tv_nsec = ms * 1000000L};
    nanosleep(&t, NULL);
}

/* The streamed pieces, concatenated. */
struct stream {
    char text[1 << 16];
    size_t len;
    int pieces;
    int stop_after; /* return false on this piece (0: never) */
    /* For the cancel test: the first piece waits until the other thread has cancelled. */
    atomic_int first_piece_seen;
    atomic_int cancel_sent;
};

static bool on_text(const char *text, size_t len, void *user_data) {
    struct stream *s = user_data;
    CHECK(text[len] == '\0', "piece not NUL-terminated");
    CHECK(s->len + len < sizeof s->text, "answer too long");
    memcpy(s->text + s->len, text, len);
    s->len += len;
    s->pieces++;
    if (!atomic_load(&s->first_piece_seen)) {
        atomic_store(&s->first_piece_seen, 1);
        while (s->stop_after < 0 && !atomic_load(&s->cancel_sent)) {
            pause_ms(1);
        }
    }
    return s->stop_after <= 0 || s->pieces < s->stop_after;
}

struct canceller {
    const LoupeModel *model;
    struct stream *stream;
};

static void *cancel_when_streaming(void *arg) {
    struct canceller *c = arg;
    while (!atomic_load(&c->stream->first_piece_seen)) {
        pause_ms(1);
    }
    loupe_model_cancel(c->model);
    atomic_store(&c->stream->cancel_sent, 1);
    return NULL;
}

static void print_answer(const char *key, const LoupeAnswer *a, const struct stream *s) {
    CHECK(a->text != NULL && a->text[a->text_len] == '\0', "%s: answer text", key);
    CHECK(s->len == a->text_len && memcmp(s->text, a->text, s->len) == 0,
          "%s: the streamed text differs from the answer", key);
    printf("%s\t{\"finish\":%d,\"answer_tokens\":%u,\"prompt_tokens\":%u,\"pieces\":%d,\"text\":", key,
           (int)a->finish, a->answer_tokens, a->prompt_tokens, s->pieces);
    print_json_string(a->text, a->text_len);
    printf("}\n");
}

static const char *PROMPT = "Inspect the machined part.";

int main(int argc, char **argv) {
    CHECK(argc == 2 || argc == 7, "usage: check MODEL [SPEC IMAGE PIXELS WIDTH HEIGHT]");
    print_text("version", loupe_version(), strlen(loupe_version()));

    LoupeModel *model = (LoupeModel *)1;
    bad("load_null_path", loupe_model_load(NULL, NULL, &model));
    CHECK(model == NULL, "out not cleared");
    bad("load_null_out", loupe_model_load(argv[1], NULL, NULL));
    bad("load_missing", loupe_model_load("/nonexistent/model", NULL, &model));
    LoupeLoadOptions lo = loupe_load_options_default();
    lo.quant = "q3_x";
    bad("load_bad_quant", loupe_model_load(argv[1], &lo, &model));
    lo = loupe_load_options_default();
    lo.dtype = "\xff\xfe";
    bad("load_not_utf8", loupe_model_load(argv[1], &lo, &model));

    lo = loupe_load_options_default();
    lo.threads = 2;
    CHECK(loupe_model_load(argv[1], &lo, &model) == LOUPE_STATUS_OK, "load %s", argv[1]);
    CHECK(model != NULL && loupe_last_error()[0] == '\0', "load left an error");
    if (argc == 2) {
        loupe_model_free(model);
        printf("loaded\ttrue\n");
        return 0;
    }

    size_t image_len = 0, pixels_len = 0;
    unsigned char *image_bytes = read_file(argv[3], &image_len);
    unsigned char *pixels = read_file(argv[4], &pixels_len);
    uint32_t width = (uint32_t)atoi(argv[5]), height = (uint32_t)atoi(argv[6]);
    CHECK(pixels_len == (size_t)width * height * 3, "PIXELS is not WIDTH x HEIGHT RGB");
    LoupeImage encoded = {.data = image_bytes, .len = image_len};
    /* The same pixels with rows 7 bytes apart more than they need. */
    size_t stride = (size_t)width * 3 + 7;
    unsigned char *padded = calloc(stride * height, 1);
    for (uint32_t y = 0; y < height; y++) {
        memcpy(padded + y * stride, pixels + (size_t)y * width * 3, (size_t)width * 3);
    }
    LoupeImage raw = {.data = padded, .len = stride * height, .width = width, .height = height,
                      .stride = stride};

    /* Greedy answers, streamed: from the encoded image and from its pixels. */
    LoupeGenerateOptions go = loupe_generate_options_default();
    go.temperature = 0;
    go.max_tokens = 24;
    struct stream *s = calloc(1, sizeof *s);
    LoupeAnswer answer;
    CHECK(loupe_generate(model, PROMPT, &encoded, 1, &go, on_text, s, &answer) == LOUPE_STATUS_OK,
          "generate");
    print_answer("answer", &answer, s);
    loupe_answer_clear(&answer);
    CHECK(answer.text == NULL, "clear");
    loupe_answer_clear(&answer);
    loupe_answer_clear(NULL);

    memset(s, 0, sizeof *s);
    CHECK(loupe_generate(model, PROMPT, &raw, 1, &go, on_text, s, &answer) == LOUPE_STATUS_OK,
          "generate from pixels");
    print_answer("answer_pixels", &answer, s);
    loupe_answer_clear(&answer);

    /* The callback stops the answer after two pieces. */
    memset(s, 0, sizeof *s);
    s->stop_after = 2;
    CHECK(loupe_generate(model, PROMPT, &encoded, 1, &go, on_text, s, &answer) == LOUPE_STATUS_OK,
          "generate, stopped by the callback");
    print_answer("answer_stopped", &answer, s);
    loupe_answer_clear(&answer);

    /* Another thread cancels while the answer streams. */
    memset(s, 0, sizeof *s);
    s->stop_after = -1;
    struct canceller c = {.model = model, .stream = s};
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, cancel_when_streaming, &c) == 0, "pthread_create");
    CHECK(loupe_generate(model, PROMPT, &encoded, 1, &go, on_text, s, &answer) == LOUPE_STATUS_OK,
          "generate, cancelled");
    pthread_join(thread, NULL);
    print_answer("answer_cancelled", &answer, s);
    loupe_answer_clear(&answer);
    /* The next answer is not cancelled; no callback, no answer wanted. */
    CHECK(loupe_generate(model, PROMPT, &encoded, 1, &go, NULL, NULL, NULL) == LOUPE_STATUS_OK,
          "generate after a cancel");

    /* Inspection: the encoded image, then its pixels. */
    LoupeInspector *inspector = NULL;
    CHECK(loupe_inspector_open(model, argv[2], &inspector) == LOUPE_STATUS_OK, "open %s", argv[2]);
    char *record = NULL;
    CHECK(loupe_inspect(inspector, &encoded, "part.png", &record) == LOUPE_STATUS_OK, "inspect");
    printf("record\t%s\n", record);
    loupe_string_free(record);
    CHECK(loupe_inspect(inspector, &raw, NULL, &record) == LOUPE_STATUS_OK, "inspect pixels");
    printf("record_pixels\t%s\n", record);
    loupe_string_free(record);

    /* Bad inputs through every call: a status and a message, never a crash. */
    LoupeAnswer a;
    bad("generate_null_model", loupe_generate(NULL, PROMPT, NULL, 0, NULL, NULL, NULL, &a));
    CHECK(a.text == NULL, "answer not cleared on failure");
    bad("generate_null_prompt", loupe_generate(model, NULL, NULL, 0, NULL, NULL, NULL, NULL));
    bad("generate_not_utf8", loupe_generate(model, "\xc3\x28", NULL, 0, NULL, NULL, NULL, NULL));
    bad("generate_empty", loupe_generate(model, "  ", NULL, 0, NULL, NULL, NULL, NULL));
    bad("generate_null_images", loupe_generate(model, PROMPT, NULL, 2, NULL, NULL, NULL, NULL));
    LoupeImage broken = {.data = (const uint8_t *)"not an image", .len = 12};
    bad("generate_not_an_image", loupe_generate(model, PROMPT, &broken, 1, &go, NULL, NULL, NULL));
    LoupeImage null_data = {.data = NULL, .len = 10};
    bad("generate_null_data", loupe_generate(model, PROMPT, &null_data, 1, &go, NULL, NULL, NULL));
    LoupeImage short_pixels = raw;
    short_pixels.len = stride * (height - 1) + (size_t)width * 3 - 1;
    bad("generate_short_pixels",
        loupe_generate(model, PROMPT, &short_pixels, 1, &go, NULL, NULL, NULL));
    LoupeImage narrow = raw;
    narrow.stride = width * 3 - 1;
    bad("generate_narrow_stride", loupe_generate(model, PROMPT, &narrow, 1, &go, NULL, NULL, NULL));
    LoupeImage one_side = raw;
    one_side.height = 0;
    bad("generate_one_side", loupe_generate(model, PROMPT, &one_side, 1, &go, NULL, NULL, NULL));
    LoupeImage huge = raw;
    huge.width = 100000;
    huge.height = 100000;
    bad("generate_huge_pixels", loupe_generate(model, PROMPT, &huge, 1, &go, NULL, NULL, NULL));
    LoupeGenerateOptions o = go;
    o.max_tokens = 0;
    bad("generate_zero_tokens", loupe_generate(model, PROMPT, NULL, 0, &o, NULL, NULL, NULL));
    o = go;
    o.temperature = NAN;
    bad("generate_nan", loupe_generate(model, PROMPT, NULL, 0, &o, NULL, NULL, NULL));
    o = go;
    o.top_p = 2;
    bad("generate_top_p", loupe_generate(model, PROMPT, NULL, 0, &o, NULL, NULL, NULL));
    o = go;
    o.json_schema = "{not json";
    bad("generate_schema_not_json", loupe_generate(model, PROMPT, NULL, 0, &o, NULL, NULL, NULL));
    o = go;
    o.json_schema = "{\"type\": \"no such type\"}";
    bad("generate_schema_invalid", loupe_generate(model, PROMPT, NULL, 0, &o, NULL, NULL, NULL));
    o = go;
    o.stop_count = 3;
    bad("generate_null_stop", loupe_generate(model, PROMPT, NULL, 0, &o, NULL, NULL, NULL));

    LoupeInspector *none = (LoupeInspector *)1;
    bad("open_missing_spec", loupe_inspector_open(model, "/nonexistent/spec.toml", &none));
    CHECK(none == NULL, "inspector out not cleared");
    bad("open_null_model", loupe_inspector_open(NULL, argv[2], &none));
    bad("inspect_null_image", loupe_inspect(inspector, NULL, NULL, &record));
    CHECK(record == NULL, "record out not cleared");
    bad("inspect_null_out", loupe_inspect(inspector, &encoded, NULL, NULL));
    bad("inspect_short_pixels", loupe_inspect(inspector, &short_pixels, NULL, &record));
    CHECK(record == NULL, "no record for an argument at fault");
    /* An image that does not decode: an error status, and the record that says why. */
    bad("inspect_not_an_image", loupe_inspect(inspector, &broken, "broken.png", &record));
    CHECK(record != NULL, "no record for an image that failed");
    printf("record_broken\t%s\n", record);
    loupe_string_free(record);

    /* The inspector keeps the model alive: free the model first. */
    loupe_model_free(model);
    CHECK(loupe_inspect(inspector, &encoded, "again.png", &record) == LOUPE_STATUS_OK,
          "inspect after the model was freed");
    printf("record_again\t%s\n", record);
    loupe_string_free(record);
    loupe_inspector_free(inspector);
    loupe_inspector_free(NULL);
    loupe_model_free(NULL);
    loupe_string_free(NULL);
    loupe_model_cancel(NULL);
    free(s);
    free(padded);
    free(pixels);
    free(image_bytes);
    printf("done\ttrue\n");
    return 0;
}
