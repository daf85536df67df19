// njs for the nginx proxy of the OpenAI-shaped scenario (nginx.conf beside
// this file): js_content reads the request body, this parses it as JSON and
// hands the request, body kept, to the named location of its model's replica.
// Any other model, or a body without one, is answered 404; a body that is not
// JSON, 400 (OpenAI-style error JSON).
function err(r, status, code, msg) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify({ error: { message: msg, type: 'invalid_request_error', code: code } }));
}

function model(r) {
    var m;
    try {
        m = JSON.parse(r.requestText).model;
    } catch (e) {
        err(r, 400, 'invalid_json', 'the body is not JSON');
        return;
    }
    if (m === 'm1') {
        r.internalRedirect('@m1');
    } else if (m === 'm2') {
        r.internalRedirect('@m2');
    } else {
        err(r, 404, 'model_not_found', 'model not found');
    }
}

export default { model };
